"""Meta-training lowers the test error far below an untrained model and the zero predictor."""

from __future__ import annotations

import pytest
import torch

from pyro_meta.config import RunConfig
from pyro_meta.evaluate import evaluate
from pyro_meta.methods import build_learner, resolve
from pyro_meta.tasks import get_benchmark
from pyro_meta.train import fit

# ABML learns more slowly than MAML at the start (its single-sample ELBO is noisy, and its inner KL
# holds q near the prior): it gets a looser bound. Measured at these seeds on a 2-core CPU: MAML 600
# steps -> test MSE 0.32 of the zero predictor; ABML 400 steps -> 0.48 (0.37 at 600, 0.56 at 1000 before
# issue 12's changes; 400 keeps the default suite short, issue 20).
STEPS = {"maml": 600, "abml": 400}
BOUND = {"maml": 0.5, "abml": 0.7}


def _zero_mse(batch) -> float:
    return float((batch.y_query**2).flatten(1).mean(-1).mean())


def _setup(method: str, meta_batch: int, seed: int, num_test_tasks: int, eval_samples: int):
    cfg = resolve(RunConfig(method=method, shots=10, meta_batch=meta_batch, seed=seed, eval_samples=eval_samples))
    bench = get_benchmark("sinusoid", shots=10, meta_batch=meta_batch, num_test_tasks=num_test_tasks, seed=seed)
    torch.manual_seed(seed)
    return cfg, bench, build_learner(cfg)


@pytest.mark.parametrize("method", ["maml", "abml"])
def test_meta_training_beats_untrained_and_zero_predictor(method):
    cfg, bench, learner = _setup(method, meta_batch=10, seed=0, num_test_tasks=100, eval_samples=20)
    before, _ = evaluate(learner, bench.test, num_samples=cfg.eval_samples)
    fit(learner, bench.train, steps=STEPS[method], progress=False)
    after, _ = evaluate(learner, bench.test, num_samples=cfg.eval_samples)
    zero = _zero_mse(bench.test)
    mse0, mse1 = before["mse"]["mean"], after["mse"]["mean"]
    print(f"{method}: untrained {mse0:.3f}, trained {mse1:.3f}, zero predictor {zero:.3f}")
    assert mse1 < BOUND[method] * zero, f"{method}: test MSE {mse1:.3f} vs zero predictor {zero:.3f}"
    assert mse1 < BOUND[method] * mse0, f"{method}: test MSE {mse1:.3f} vs untrained {mse0:.3f}"
    assert after["nll"]["mean"] < before["nll"]["mean"]
    assert after["nonfinite_tasks"]["count"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["maml", "abml"])
def test_longer_training_reaches_a_low_error(method):
    cfg, bench, learner = _setup(method, meta_batch=25, seed=1, num_test_tasks=200, eval_samples=50)
    fit(learner, bench.train, steps=5000, progress=False)
    after, _ = evaluate(learner, bench.test, num_samples=cfg.eval_samples)
    assert after["mse"]["mean"] < 0.35 * _zero_mse(bench.test)
