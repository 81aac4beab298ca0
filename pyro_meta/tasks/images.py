"""Your own images in: the library's Omniglot preprocessing as a public function, and a few-shot task built
from folders of labelled support images and query images, for a trained classification run.

Preprocessing (exactly what the Omniglot loader does to every drawing): to 8-bit grey (PIL ``"L"``),
inverted (a white background becomes 0, dark ink 255), resized to ``image_size`` x ``image_size`` with
PIL's LANCZOS filter when it differs, scaled to [0, 1]: ``[N, 1, S, S]`` float32, ink = 1. Draw dark strokes
on a light background, as Omniglot's drawings are.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .batch import TaskBatch
from .omniglot import DataError

IMAGE_SIZE = 28
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

__all__ = ["IMAGE_SIZE", "preprocess_images", "task_from_folders"]


def _as_pil(item: Any, where: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as im:
                im.load()
                return im
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: cannot read the image file {str(item)!r} ({e})") from e
    if isinstance(item, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(item)) as im:
                im.load()
                return im
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: the bytes are not an image PIL can read ({e})") from e
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        a = item
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., :3].mean(-1)
        if a.ndim != 2:
            raise DataError(f"{where}: an image array must be [H, W] (or [H, W, 3/4]), got shape {list(item.shape)}")
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255  # True = white background, as Omniglot's 1-bit PNGs
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise DataError(f"{where}: a float image must hold values in [0, 1] (1 = white background)")
            a = np.round(a * 255).astype(np.uint8)
        elif a.dtype != np.uint8:
            raise DataError(f"{where}: image arrays must be uint8, bool or float in [0, 1], got {a.dtype}")
        return Image.fromarray(a, mode="L")
    raise DataError(f"{where}: expected an image path, PNG/JPEG bytes, a PIL image or an [H, W] array, got "
                    f"{type(item).__name__}")


_INVERT = [255 - v for v in range(256)]


def preprocess_images(images: Sequence[Any], image_size: int = IMAGE_SIZE) -> Tensor:
    """Images (paths, bytes, PIL images or ``[H, W]`` arrays; dark ink on a light background) ->
    ``[N, 1, S, S]`` float32 in [0, 1], ink = 1: the Omniglot loader's preprocessing (module docstring)."""
    if isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor)):
        images = [images]
    out = []
    for i, item in enumerate(images):
        im = _as_pil(item, f"image {i}").convert("L").point(_INVERT)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
        out.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(image_size, image_size))
    if not out:
        raise DataError("no images given")
    return torch.stack(out).unsqueeze(1).to(torch.float32).div_(255.0)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def task_from_folders(support_dir: str | os.PathLike, query_dir: str | os.PathLike,
                      image_size: int = IMAGE_SIZE) -> tuple[TaskBatch, list[str], list[Path]]:
    """One few-shot task from your own images.

    - ``support_dir``: one sub-folder per class, named after it, holding that class's support images
      (the same number in each: the run's shots). Classes are labelled 0..N-1 in sorted folder order.
    - ``query_dir``: the images to classify, unlabelled (image files directly in it), or labelled (one
      sub-folder per class, the same names as the support's: the labels are then in the batch, for scoring).

    :returns: ``(batch, class_names, query_files)``: a one-task :class:`TaskBatch` (``y_query`` None when
        the queries are unlabelled), the class names in label order, the query files in batch order."""
    support_dir, query_dir = Path(support_dir), Path(query_dir)
    for d, what in ((support_dir, "support"), (query_dir, "query")):
        if not d.is_dir():
            raise DataError(f"the {what} folder {str(d)!r} does not exist or is not a folder")
    classes = sorted(p.name for p in support_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{support_dir}: expected one sub-folder per class (at least 2), found {len(classes)}")
    files = {c: _image_files(support_dir / c) for c in classes}
    shots = {c: len(f) for c, f in files.items()}
    if len(set(shots.values())) != 1 or min(shots.values()) == 0:
        raise DataError(f"{support_dir}: every class needs the same number (>= 1) of support images; found {shots}")
    x_s = preprocess_images([f for c in classes for f in files[c]], image_size)
    y_s = torch.arange(len(classes)).repeat_interleave(shots[classes[0]])
    labelled = sorted(p.name for p in query_dir.iterdir() if p.is_dir())
    if labelled:
        unknown = sorted(set(labelled) - set(classes))
        if unknown:
            raise DataError(f"{query_dir}: query classes {unknown} have no support folder in {support_dir}")
        q_files = [f for c in labelled for f in _image_files(query_dir / c)]
        y_q = torch.tensor([classes.index(c) for c in labelled for _ in _image_files(query_dir / c)])[None]
    else:
        q_files, y_q = _image_files(query_dir), None
    if not q_files:
        raise DataError(f"{query_dir}: no query images ({', '.join(IMAGE_SUFFIXES)})")
    x_q = preprocess_images(q_files, image_size)
    return TaskBatch(x_s[None], y_s[None], x_q[None], y_q), classes, q_files
