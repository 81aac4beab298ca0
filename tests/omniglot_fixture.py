"""A generated Omniglot: the canonical layout and zips with random drawings, so the real loader, cache,
splits and episode code run where the real data (``../shared/data/omniglot``) are not.

Drawings are seeded noise (about 10% ink, 1-bit PNGs, 105x105), filed as the public download files them:
``images_background.zip`` / ``images_evaluation.zip`` holding ``<half>/<Alphabet>/characterNN/<id>_<drawer>.png``.
Alphabet names are real ones, so the Vinyals split (by alphabet) and Lake's (by half) apply. Nothing here
can be learned: tests on it check plumbing, shapes and protocol, never accuracy.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from PIL import Image

# alphabet -> characters, per half. Vinyals parts: Angelic, Latin, Gurmukhi train (8 characters, 32
# classes with rotations); Hebrew val (5, 20); Tengwar, Kannada test (6, 24): 20-way episodes fit in val
# and test. Lake's halves: background 11 characters, evaluation 8.
SMALL = {
    "images_background": {"Angelic": 4, "Latin": 2, "Hebrew": 5},
    "images_evaluation": {"Tengwar": 3, "Kannada": 3, "Gurmukhi": 2},
}


def drawings(layout: dict[str, dict[str, int]], seed: int = 0) -> dict[str, tuple[bytes, torch.Tensor]]:
    """zip member -> (1-bit PNG bytes, bool ``[105, 105]``, True = white background), 20 drawers per
    character, character ids numbered across the halves in order."""
    g = torch.Generator().manual_seed(seed)
    out, charid = {}, 0
    for half, alphabets in layout.items():
        for alphabet, n in alphabets.items():
            for c in range(1, n + 1):
                charid += 1
                for drawer in range(1, 21):
                    white = torch.rand(105, 105, generator=g) > 0.1  # ~10% ink, like strokes
                    im = Image.frombytes("L", (105, 105), bytes((white.to(torch.uint8) * 255).flatten().tolist()))
                    im = im.convert("1", dither=Image.Dither.NONE)
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    member = f"{half}/{alphabet}/character{c:02d}/{charid:04d}_{drawer:02d}.png"
                    out[member] = (buf.getvalue(), white)
    return out


def write_omniglot(root: Path, layout: dict[str, dict[str, int]] = SMALL, form: str = "zip",
                   drop: str | None = None, stored: bool = False, override: dict[str, bytes] | None = None,
                   made: dict[str, tuple[bytes, torch.Tensor]] | None = None) -> Path:
    """Write an Omniglot-layout data root into ``root`` (``form`` "zip" or "folder"), without member
    ``drop``, with the PNG bytes of the members in ``override`` replaced; ``made``: the drawings, if the
    caller already generated them. Members are written in reverse order, on purpose (a loader must sort)."""
    made = drawings(layout) if made is None else made
    png = {m: b for m, (b, _) in made.items()} | (override or {})
    root.mkdir(parents=True, exist_ok=True)
    members = [m for m in made if m != drop]
    for half in layout:
        mine = [m for m in reversed(members) if m.startswith(half + "/")]
        if form == "zip":
            mode = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            with zipfile.ZipFile(root / f"{half}.zip", "w", mode) as z:
                for m in mine:
                    z.writestr(m, png[m])
        else:
            for m in mine:
                (root / m).parent.mkdir(parents=True, exist_ok=True)
                (root / m).write_bytes(png[m])
    return root
