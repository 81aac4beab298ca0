"""Few-shot classification one image at a time: with a non-transductive normalization (the conv4 trunk's
``support``, ``tasknorm``, ``instance``, ``none`` modes) a prediction never depends on which other query
images are asked with it: the query set scored whole, one image at a time, or in reverse order gives the
same probabilities for every classification method. The transductive ``task`` mode does not (that is why
it is named as such), and the run's protocol says so."""

from __future__ import annotations

import pytest
import torch

from pyro_meta.config import RunConfig
from pyro_meta.evaluate import predict
from pyro_meta.methods import build_learner, resolve
from pyro_meta.nn import BATCH_NORM_MODES, Conv4
from pyro_meta.run import benchmark_of

CLASSIFIERS = ("maml", "versa", "abml", "bmaml")
# None: the default (resolved per method), which must never read the query set
NON_TRANSDUCTIVE = (None, *(m for m in BATCH_NORM_MODES if m != "task"))


def _setup(omniglot_root, method: str, mode: str):
    steps = {} if method == "versa" else {"inner_steps_eval": 2}
    cfg = resolve(RunConfig(benchmark="omniglot", method=method, ways=3, shots=2, queries=3,
                            data_root=str(omniglot_root), filters=8, batch_norm=mode, num_test_tasks=2,
                            num_val_tasks=2, eval_samples=4, seed=0, **steps))
    learner = build_learner(cfg)
    learner.eval()
    return learner, benchmark_of(cfg).test.select(slice(0, 2))


def _probs(learner, batch, seed: int = 0) -> torch.Tensor:
    return predict(learner, batch, 4, seed, keep_latents=False).predictive_mean()  # T Q C


def _one_at_a_time(learner, batch) -> torch.Tensor:
    outs = []
    for i in range(batch.num_query):
        sub = type(batch)(batch.x_support, batch.y_support, batch.x_query[:, i:i + 1],
                          batch.y_query[:, i:i + 1], batch.info)
        outs.append(_probs(learner, sub))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("method", CLASSIFIERS)
@pytest.mark.parametrize("mode", NON_TRANSDUCTIVE)
def test_a_query_image_is_scored_the_same_alone_in_a_set_or_in_any_order(omniglot_root, method, mode):
    learner, batch = _setup(omniglot_root, method, mode)
    assert learner.protocol["batch_norm"] and "TRANSDUCTIVE" not in learner.protocol["batch_norm"]
    whole = _probs(learner, batch)
    alone = _one_at_a_time(learner, batch)
    rev = torch.arange(batch.num_query - 1, -1, -1)
    reordered = _probs(learner, type(batch)(batch.x_support, batch.y_support, batch.x_query[:, rev],
                                            batch.y_query[:, rev], batch.info))[:, rev]
    torch.testing.assert_close(alone, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reordered, whole, rtol=1e-5, atol=1e-6)
    # the answer depends on the image, by far more than the tolerance (an untrained net without
    # normalization answers nearly alike for every image: 1e-5 there, 1e-2 with one)
    assert whole.std(dim=1).max() > 1e-5


@pytest.mark.parametrize("method", ("maml", "versa"))
def test_the_transductive_mode_depends_on_the_query_set_and_says_so(omniglot_root, method):
    learner, batch = _setup(omniglot_root, method, "task")
    assert (_one_at_a_time(learner, batch) - _probs(learner, batch)).abs().max() > 1e-3
    text = learner.protocol["batch_norm"]
    assert "TRANSDUCTIVE" in text and "query" in text


def test_an_images_features_change_with_its_companions_only_under_transductive_statistics():
    """The defect behind this: with ``task`` statistics an image's features change when another image is
    passed with it; with the support set's statistics they do not."""
    g = torch.Generator().manual_seed(0)
    support = torch.rand(1, 5, 1, 28, 28, generator=g)
    a, b = torch.rand(1, 1, 1, 28, 28, generator=g), torch.rand(1, 1, 1, 28, 28, generator=g)
    task = Conv4(None, filters=8, batch_norm="task")
    p = task.init(g)
    assert (task(p, a) - task(p, torch.cat([a, b], 1))[:, :1]).abs().max() > 1e-2
    sup = Conv4(None, filters=8, batch_norm="support")
    torch.testing.assert_close(sup(p, a, context=support), sup(p, torch.cat([a, b], 1), context=support)[:, :1])
    assert not torch.allclose(sup(p, a, context=support), sup(p, b, context=support))


def test_tasknorm_blend_endpoints_are_support_and_instance_statistics():
    """a = sigmoid(scale * M + offset): offset +40 gives the support statistics, -40 the instance ones."""
    g = torch.Generator().manual_seed(1)
    support, x = torch.rand(2, 4, 1, 28, 28, generator=g), torch.rand(2, 3, 1, 28, 28, generator=g)
    tn, sup, inst = (Conv4(None, filters=6, batch_norm=m) for m in ("tasknorm", "support", "instance"))
    p = tn.init(g)
    names = tn.spec.shapes
    shared = tn.spec.unflatten(p)
    for off, ref in ((40.0, sup), (-40.0, inst)):
        q = dict(shared)
        for k in range(tn.blocks):
            q[f"bn{k}.o"] = torch.full((1,), off)
        flat = tn.spec.flatten({n: q[n] for n in names})
        ref_p = ref.spec.flatten({n: q[n] for n in ref.spec.shapes})
        torch.testing.assert_close(tn(flat, x, context=support), ref(ref_p, x, context=support), rtol=1e-5, atol=1e-5)


def test_a_transductive_run_reports_every_image_alone_beside_the_whole_query_set(omniglot_root, tmp_path, capsys):
    """eval.json of a run with batch_norm 'task' says it is transductive and holds the one-image-at-a-time
    metrics (they differ from the whole-set ones), and on --split lake Lake's within-alphabet episodes; a
    non-transductive run on the Vinyals split has none of these."""
    import json

    from pyro_meta.run import train_run

    for mode in ("task", "support"):
        cfg = RunConfig(benchmark="omniglot", method="maml", ways=3, shots=1, queries=2, data_root=str(omniglot_root),
                        filters=8, batch_norm=mode, steps=2, meta_batch=2, num_test_tasks=4, num_val_tasks=2,
                        threads=1, split="lake" if mode == "task" else None)
        out = tmp_path / mode
        train_run(cfg, out, progress=False)
        ev = json.loads((out / "eval.json").read_text())
        if mode == "task":
            alone = ev["one_image_at_a_time"]
            assert "query" in ev["transductive"] and alone["accuracy"]["n"] == 4
            assert abs(alone["nll"]["mean"] - ev["metrics"]["nll"]["mean"]) > 1e-4
            assert "every image alone" in capsys.readouterr().err
            lake = ev["within_alphabet"]  # --split lake: Lake's episodes beside the random-class ones
            assert lake["num_tasks"] == 4 and "one evaluation alphabet" in lake["protocol"]
            assert 0 <= lake["metrics"]["accuracy"]["mean"] <= 1 and "alone" in lake["metrics"]["protocol"]
            assert 0 <= lake["whole_query_set"]["accuracy"]["mean"] <= 1
        else:
            assert "one_image_at_a_time" not in ev and "transductive" not in ev


def test_lake_within_alphabet_episodes_come_from_one_alphabet_and_two_drawers(omniglot_root):
    """Lake's protocol: every class of an episode from one alphabet, no rotations, support and query
    drawings by different drawers; the run reports them beside the random-class test."""
    from pyro_meta.tasks.episodes import alphabets_of, within_alphabet_episodes
    from pyro_meta.tasks.omniglot import class_pool, load_omniglot

    pool = class_pool(load_omniglot(str(omniglot_root)), split="lake", part="evaluation", rotations=(0,))
    assert all(n.endswith("/rot000") for n in pool.names)
    names, alpha_of = alphabets_of(pool)
    ways = int(torch.bincount(alpha_of).max())
    b = within_alphabet_episodes(pool, 30, ways, 1, 2, seed=3)
    again = within_alphabet_episodes(pool, 30, ways, 1, 2, seed=3)
    assert torch.equal(b.x_query, again.x_query)
    classes = b.info["classes"]
    assert bool((alpha_of[classes] == b.info["alphabet"][:, None]).all())
    # the drawers: find each image's drawing index in the pool; support and query drawers differ, and each
    # set uses the same drawer(s) for every class
    flat = pool.images.reshape(-1, *pool.images.shape[-2:]).float() / 255
    for t in range(3):
        def drawings(x, cls):
            out = []
            for img, c in zip(x[:, 0], cls):
                d = [i for i in range(pool.drawings) if torch.equal(flat[int(c) * pool.drawings + i], img)]
                out.append(d[0])
            return out
        ds = drawings(b.x_support[t], classes[t][b.y_support[t]])
        dq = drawings(b.x_query[t], classes[t][b.y_query[t]])
        assert len(set(ds)) == 1 and len(set(dq)) == 2 and not set(ds) & set(dq)
    with pytest.raises(Exception, match="alphabet with"):
        within_alphabet_episodes(pool, 2, ways + 1, 1, 1, seed=0)
