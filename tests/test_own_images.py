"""Your own images in: the public preprocessing equals the Omniglot loader's on its own PNGs, arrays and
files go through it alike, a task is built from folders, and `pyro-meta classify` labels a folder of
drawings with a trained run (without the run's data root)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_meta.tasks import preprocess_images, task_from_folders
from pyro_meta.tasks.omniglot import DataError, _decode_png


def _pngs(omniglot_root, n: int = 12) -> list[bytes]:
    with zipfile.ZipFile(omniglot_root / "images_evaluation.zip") as z:
        names = sorted(m for m in z.namelist() if m.endswith(".png"))[:n]
        return [z.read(m) for m in names]


def test_preprocessing_is_the_loaders_for_bytes_files_and_arrays(omniglot_root, tmp_path):
    raw = _pngs(omniglot_root)
    ref = torch.stack([torch.frombuffer(bytearray(_decode_png(r, 28)), dtype=torch.uint8).view(28, 28)
                       for r in raw]).float().div(255)[:, None]
    assert torch.equal(preprocess_images(raw), ref)
    files = []
    for i, r in enumerate(raw):
        (tmp_path / f"{i}.png").write_bytes(r)
        files.append(tmp_path / f"{i}.png")
    assert torch.equal(preprocess_images(files), ref)
    grey = [np.array(Image.open(f).convert("L")) for f in files]
    assert torch.equal(preprocess_images(grey), ref)
    assert torch.equal(preprocess_images([g.astype(np.float64) / 255 for g in grey]), ref)
    with pytest.raises(DataError, match=r"\[H, W\]"):
        preprocess_images([np.zeros((2, 3, 4, 5), dtype=np.uint8)])
    with pytest.raises(DataError, match="cannot read"):
        preprocess_images([tmp_path / "missing.png"])


def _folders(omniglot_root, root, labelled_queries: bool):
    raw = _pngs(omniglot_root, 40)
    # characters 0..2 (20 drawings each in archive order): one support and two query drawings per class
    classes = {"alpha": raw[0:3], "beta": raw[20:23]}
    for name, imgs in classes.items():
        (root / "support" / name).mkdir(parents=True)
        (root / "support" / name / "a.png").write_bytes(imgs[0])
        q = root / "query" / name if labelled_queries else root / "query"
        q.mkdir(parents=True, exist_ok=True)
        for j, img in enumerate(imgs[1:]):
            (q / f"{name}{j}.png").write_bytes(img)
    return root / "support", root / "query"


def test_a_task_from_folders(omniglot_root, tmp_path):
    s, q = _folders(omniglot_root, tmp_path / "l", labelled_queries=True)
    batch, classes, files = task_from_folders(s, q)
    assert classes == ["alpha", "beta"] and batch.x_support.shape == (1, 2, 1, 28, 28)
    assert batch.y_query.tolist() == [[0, 0, 1, 1]] and len(files) == 4
    s, q = _folders(omniglot_root, tmp_path / "u", labelled_queries=False)
    batch, _, _ = task_from_folders(s, q)
    assert batch.y_query is None and batch.x_query.shape == (1, 4, 1, 28, 28)
    (s / "gamma").mkdir()
    with pytest.raises(DataError, match="same number"):
        task_from_folders(s, q)


def test_classify_cli_labels_a_folder_with_a_trained_run(omniglot_root, tmp_path):
    from pyro_meta.config import RunConfig
    from pyro_meta.run import train_run

    cfg = RunConfig(benchmark="omniglot", method="maml", ways=2, shots=1, queries=2, data_root=str(omniglot_root),
                    filters=8, batch_norm="support", steps=2, meta_batch=2, num_test_tasks=2, num_val_tasks=2,
                    threads=1)
    run = tmp_path / "run"
    train_run(cfg, run, progress=False)
    s, q = _folders(omniglot_root, tmp_path / "f", labelled_queries=True)
    r = subprocess.run([sys.executable, "-m", "pyro_meta", "classify", str(run), "--support", str(s), "--query", str(q)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("accuracy ") and all(" p=" in x for x in lines[:4])
    bad = subprocess.run([sys.executable, "-m", "pyro_meta", "classify", str(run), "--support", str(tmp_path / "no"),
                          "--query", str(q)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
