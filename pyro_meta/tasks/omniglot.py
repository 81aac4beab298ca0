"""Omniglot (Lake et al., 2015): finding, downloading, decoding and caching it, and its class splits.

The data is the two canonical zips ``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters), each holding
``images_<half>/<Alphabet>/characterNN/<charid>_<drawer>.png``: 105x105 1-bit PNGs, white
background = 1, 20 drawers per character. Either zip may also be given extracted (a folder
``images_<half>/`` with the same layout).

Splits are encoded as the facts that define them (:data:`VINYALS_VAL_ALPHABETS`,
:data:`VINYALS_TEST_ALPHABETS`, :data:`VINYALS_TEST_CHARACTERS`), never read from split files.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from types import MappingProxyType

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ..io import atomic_write, default_file_mode
from .regression import ProtocolError


class DataError(ValueError):
    """The Omniglot data is missing, damaged or not laid out as expected; the message says how to fix it."""


HALVES = ("images_background", "images_evaluation")
DRAWINGS = 20
NUM_CHARACTERS = 1623
CANONICAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
CANONICAL_MD5: Mapping[str, str] = MappingProxyType(
    {
        "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    }
)

# The Vinyals et al. (2016) split: by alphabet, over background + evaluation together, with one
# exception (Gurmukhi character42..45 are test, the rest of Gurmukhi is train).
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST_ALPHABETS = (
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
)  # fmt: skip
VINYALS_TEST_CHARACTERS = tuple(f"Gurmukhi/character{i:02d}" for i in range(42, 46))
# Characters per part on the full data (x4 rotations: 4,112 / 688 / 4,800 / 1,692 classes).
VINYALS_COUNTS = {"train": 1028, "val": 172, "trainval": 1200, "test": 423}
ROTATIONS = (0, 90, 180, 270)

_HOW_TO_GET = (
    "To get the data: run `pyro-meta download omniglot --root DIR`, or put the two canonical zips "
    f"images_background.zip and images_evaluation.zip from {CANONICAL_URL} in DIR; then pass "
    "--data-root DIR (data_root=DIR) or set PYRO_META_DATA=DIR."
)
_REDOWNLOAD = (
    "re-download it (pyro-meta download omniglot --root DIR) or replace it with the canonical zip"
)


# ----------------------------------------------------------------------------- finding the data
def default_cache_dir() -> Path:
    """The per-user cache dir: ``$PYRO_META_CACHE``, else ``$XDG_CACHE_HOME/pyro_meta``, else
    ``~/.cache/pyro_meta``. Not created here."""
    if os.environ.get("PYRO_META_CACHE"):
        return Path(os.environ["PYRO_META_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pyro_meta"
    return Path.home() / ".cache" / "pyro_meta"


def _half_source(folder: Path, half: str) -> Path | None:
    """The zip (preferred: one file, CRC-checked) or the extracted folder of ``half`` in ``folder``."""
    z = folder / f"{half}.zip"
    if z.is_file():
        return z
    d = folder / half
    return d if d.is_dir() else None


def _look_in(root: Path) -> tuple[Path | None, list[str]]:
    """``(folder holding both halves, what was seen)`` for ``root`` and ``root/omniglot``."""
    seen = []
    for folder in (root, root / "omniglot"):
        found = {h: _half_source(folder, h) for h in HALVES}
        if all(found.values()):
            return folder, seen
        have = [p.name for p in found.values() if p is not None]
        missing = [f"{h}.zip" for h, p in found.items() if p is None]
        note = f" (has {', '.join(have)} but lacks {', '.join(missing)})" if have else ""
        seen.append(f"{folder}{note}")
    return None, seen


def find_omniglot(data_root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the Omniglot files.

    Looks, in order, in ``data_root``, in ``$PYRO_META_DATA`` and in :func:`default_cache_dir`;
    in each, directly and in a subfolder ``omniglot/``. Each half may be a zip
    (``images_background.zip``) or an extracted folder (``images_background/``).

    :raises DataError: ``data_root`` was given but lacks the data (no silent fall-through), or
        nothing was found anywhere; the message lists every place looked and how to get the data.
    """
    if data_root is not None:
        folder, seen = _look_in(Path(data_root).expanduser())
        if folder is None:
            raise DataError(
                f"no Omniglot data in the given data root {data_root}: looked in {'; '.join(seen)}. "
                f"Expected images_background.zip and images_evaluation.zip (or the extracted "
                f"folders) there. {_HOW_TO_GET}"
            )
        return folder
    looked = []
    candidates = []
    if os.environ.get("PYRO_META_DATA"):
        candidates.append(("$PYRO_META_DATA", Path(os.environ["PYRO_META_DATA"]).expanduser()))
    candidates.append(("the cache dir", default_cache_dir()))
    for label, root in candidates:
        folder, seen = _look_in(root)
        if folder is not None:
            if looked:  # PYRO_META_DATA was set but is wrong: say so rather than hide it
                warnings.warn(f"Omniglot not in {'; '.join(looked)}; using {folder}", stacklevel=2)
            return folder
        looked.extend(f"{s} [{label}]" for s in seen)
    raise DataError(f"Omniglot data not found; looked in: {'; '.join(looked)}. {_HOW_TO_GET}")


# ----------------------------------------------------------------------------- listing
_MEMBER = re.compile(
    r"^(images_background|images_evaluation)/([^/]+)/(character\d+)/(?:(\d+)_(\d+)\.png)?$"
)


@dataclass
class _Listing:
    """Where every drawing of every character of one half is, and a fingerprint of the sources."""

    source: Path
    chars: dict[str, list[tuple[int, str]]]  # "Alphabet/characterNN" -> [(drawer, member)]
    fingerprint: list[str]


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(
            f"{path} is not a readable zip file ({e}); it is damaged or truncated: {_REDOWNLOAD}"
        ) from e


def _list_half(source: Path, half: str) -> _Listing:
    chars: dict[str, list[tuple[int, str]]] = {}
    prints: list[str] = []
    if source.suffix == ".zip":
        with _open_zip(source) as z:
            entries = [(i.filename, f"{i.CRC}:{i.file_size}") for i in z.infolist()]
    else:
        entries = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            rel = Path(dirpath).relative_to(source.parent).as_posix()
            entries.append((rel + "/", ""))
            for f in sorted(filenames):
                st = os.stat(os.path.join(dirpath, f))
                entries.append((f"{rel}/{f}", f"{st.st_size}:{st.st_mtime_ns}"))
    if not any(name.startswith(f"{half}/") for name, _ in entries):
        raise DataError(
            f"{source} does not hold the expected top folder {half}/ (the canonical layout is "
            f"{half}/<Alphabet>/characterNN/<charid>_<drawer>.png): {_REDOWNLOAD}"
        )
    for name, stamp in entries:
        m = _MEMBER.match(name)
        if m is None or m.group(1) != half:
            continue  # other files (READMEs, __MACOSX, .DS_Store) are not drawings
        drawings = chars.setdefault(f"{m.group(2)}/{m.group(3)}", [])
        if m.group(5) is not None:
            drawings.append((int(m.group(5)), name))
            prints.append(f"{name}={stamp}")
    if not chars:
        raise DataError(
            f"{source} holds no {half}/<Alphabet>/characterNN/*.png drawings: {_REDOWNLOAD}"
        )
    for char, drawings in chars.items():
        drawers = sorted(d for d, _ in drawings)
        if drawers != list(range(1, DRAWINGS + 1)):
            missing = sorted(set(range(1, DRAWINGS + 1)) - set(drawers))
            odd = sorted(d for d in set(drawers) if drawers.count(d) > 1 or not 1 <= d <= DRAWINGS)
            raise DataError(
                f"{source}: character {char} has {len(drawings)} drawing(s), expected {DRAWINGS} "
                f"(one per drawer 01..{DRAWINGS}; missing drawers {missing}, duplicate or "
                f"unexpected drawers {odd}); the data is incomplete: {_REDOWNLOAD}"
            )
        drawings.sort()  # by drawer, so index d is drawer d + 1
    return _Listing(source, chars, prints)


def _list_all(folder: Path) -> list[_Listing]:
    listings = [_list_half(_half_source(folder, h), h) for h in HALVES]
    alphabets = [{c.split("/")[0] for c in lst.chars} for lst in listings]
    both = alphabets[0] & alphabets[1]
    if both:
        raise DataError(
            f"alphabet(s) {sorted(both)} appear in both halves of {folder}: {_REDOWNLOAD}"
        )
    return listings


def _names(listings: list[_Listing]) -> list[str]:
    return [c for lst in listings for c in sorted(lst.chars)]


def omniglot_characters(data_root: str | os.PathLike | None = None) -> list[str]:
    """The ``"Alphabet/characterNN"`` names in :func:`load_omniglot`'s order, from the zips'
    listings alone (no PNG decoding: well under a second). Enough for :func:`vinyals_split`."""
    return _names(_list_all(find_omniglot(data_root)))


# ----------------------------------------------------------------------------- decoding
@dataclass
class OmniglotData:
    """All of Omniglot, decoded.

    - ``images``: uint8 ``[num_chars, 20, S, S]``, ink = 255, background = 0; drawing ``d`` is
      drawer ``d + 1``.
    - ``names``: ``num_chars`` names ``"Alphabet/characterNN"``: background alphabets then
      evaluation alphabets, each sorted by alphabet then character.
    - ``background``: bool ``[num_chars]``, True for Lake's background set.
    """

    images: Tensor
    names: list[str]
    background: Tensor

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[0] != n:
            raise DataError(
                f"OmniglotData.images: expected uint8 [{n}, {DRAWINGS}, S, S], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.background.dtype != torch.bool or tuple(self.background.shape) != (n,):
            raise DataError(
                f"OmniglotData.background: expected bool [{n}], "
                f"got {self.background.dtype} {tuple(self.background.shape)}"
            )

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def _decode_png(data: bytes, image_size: int) -> bytes:
    """One drawing: 1-bit PNG bytes -> ``image_size**2`` uint8 bytes, ink = 255, LANCZOS-resized."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L").point(_INVERT)  # white background (1) -> 0, ink (0) -> 255
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), resample=Image.Resampling.LANCZOS)
    return im.tobytes()


_INVERT = [255 - v for v in range(256)]


def _read_member(listing: _Listing, z: zipfile.ZipFile | None, member: str) -> bytes:
    if z is None:
        return (listing.source.parent / member).read_bytes()
    return z.read(member)


def _decode_sources(listings: list[_Listing], image_size: int, progress: bool) -> Tensor:
    """Decode every drawing: uint8 ``[num_chars, 20, S, S]`` in :func:`_names` order."""
    total = sum(len(lst.chars) for lst in listings) * DRAWINGS
    out = bytearray()
    # a log file (no terminal) gets a line every 30 s, not one per refresh
    with tqdm(total=total, desc="decoding Omniglot", unit="img", disable=not progress,
              mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
        for lst in listings:
            z = _open_zip(lst.source) if lst.source.suffix == ".zip" else None
            try:
                for char in sorted(lst.chars):
                    for _, member in lst.chars[char]:
                        try:
                            raw = _read_member(lst, z, member)
                        except (
                            zipfile.BadZipFile,
                            zlib.error,
                            EOFError,
                            OSError,
                            NotImplementedError,
                        ) as e:
                            # a bad CRC or damaged deflate stream: the zip is corrupt
                            raise DataError(
                                f"{lst.source}: cannot read {member} ({e}): {_REDOWNLOAD}"
                            ) from e
                        try:
                            out += _decode_png(raw, image_size)
                        except (OSError, ValueError, SyntaxError) as e:
                            raise DataError(
                                f"{lst.source}: {member} is not a readable PNG ({e}): {_REDOWNLOAD}"
                            ) from e
                    bar.update(DRAWINGS)
            finally:
                if z is not None:
                    z.close()
    images = torch.frombuffer(out, dtype=torch.uint8) if out else torch.empty(0, dtype=torch.uint8)
    return images.reshape(-1, DRAWINGS, image_size, image_size)


# ----------------------------------------------------------------------------- cache
_CACHE_FORMAT = 1


def _fingerprint(listings: list[_Listing], image_size: int) -> str:
    h = hashlib.sha256(f"omniglot v{_CACHE_FORMAT} {image_size}px LANCZOS\n".encode())
    for lst in listings:
        h.update("\n".join(lst.fingerprint).encode())
    return h.hexdigest()


def _digest(images: Tensor, background: Tensor) -> str:
    # Guards against bit rot that leaves the file loadable: a cache that differs is never used.
    h = hashlib.blake2b(images.contiguous().numpy(), digest_size=16)
    h.update(background.to(torch.uint8).numpy())
    return h.hexdigest()


def _load_cache(
    path: Path, fingerprint: str, names: list[str], image_size: int
) -> OmniglotData | None:
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        images = obj["images"]
        problem = None
        if obj.get("format") != _CACHE_FORMAT:
            problem = f"format {obj.get('format')!r}, expected {_CACHE_FORMAT}"
        elif obj.get("fingerprint") != fingerprint or obj.get("names") != names:
            problem = "it was made from other source files"
        elif (
            not isinstance(images, Tensor)
            or images.dtype != torch.uint8
            or tuple(images.shape) != (len(names), DRAWINGS, image_size, image_size)
        ):
            problem = "its images have the wrong shape or dtype"
        elif obj.get("digest") != _digest(images, obj["background"]):
            problem = "its images do not match their checksum"
        if problem is None:
            return OmniglotData(images, list(names), obj["background"])
    except Exception as e:  # any unreadable file (truncated, garbage, wrong types) is just rebuilt
        problem = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"ignoring the invalid Omniglot cache {path} ({problem}); rebuilding it", stacklevel=3
    )
    return None


def _save_cache(path: Path, data: OmniglotData, fingerprint: str) -> None:
    """Write atomically: a temp file in the same dir, fsync, then rename, so readers never see a
    half-written cache. A cache that cannot be written is only a warning."""
    obj = {
        "format": _CACHE_FORMAT,
        "fingerprint": fingerprint,
        "names": data.names,
        "images": data.images,
        "background": data.background,
        "digest": _digest(data.images, data.background),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save on a full disk
        warnings.warn(
            f"could not write the Omniglot cache {path} ({e}); the next load decodes again",
            stacklevel=3,
        )


def load_omniglot(
    data_root: str | os.PathLike | None = None,
    image_size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> OmniglotData:
    """All 1,623 characters x 20 drawings, inverted (ink = 255) and resized to ``image_size``.

    Reads the zips directly (no extraction) or the extracted folders, found by
    :func:`find_omniglot`. Each 105x105 drawing is inverted, then resized with Pillow's
    antialiased ``LANCZOS`` filter (skipped when ``image_size`` is 105) and stored as uint8.
    The MD5 of the zips is not checked (rebuilt zips with the same pixels are fine); their
    zip CRCs are.

    The result is cached in ``cache_dir`` (default ``default_cache_dir()/omniglot``; never the
    data root, which may be read-only) under a name with ``image_size`` and a fingerprint of the
    sources (zip entries' names, CRCs and sizes; or files' names, sizes and mtimes). An invalid
    cache is ignored with a warning and rebuilt.

    Measured on 2 CPU cores shared with other jobs: the first decode of the 32,460 PNGs takes
    about 6 s at 28x28 (about 0.19 ms per drawing, single-threaded); a load from the cache about
    0.25 s (reading the zip listings for the fingerprint, then the 25 MB tensor file).

    :returns: :class:`OmniglotData`, ``images`` uint8 ``[1623, 20, image_size, image_size]``.
    :raises DataError: data missing, a damaged zip or PNG, a character without 20 drawings.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ProtocolError(f"image_size must be a positive integer, got {image_size!r}")
    folder = find_omniglot(data_root)
    listings = _list_all(folder)
    names = _names(listings)
    fingerprint = _fingerprint(listings, image_size)
    cache = (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "omniglot"
    )
    path = cache / f"omniglot-{image_size}px-{fingerprint[:16]}.pt"
    data = _load_cache(path, fingerprint, names, image_size)
    if data is not None:
        return data
    images = _decode_sources(listings, image_size, progress)
    background = torch.tensor(
        [i < len(listings[0].chars) for i in range(len(names))], dtype=torch.bool
    )
    data = OmniglotData(images, names, background)
    _save_cache(path, data, fingerprint)
    return data


# ----------------------------------------------------------------------------- splits
def _names_of(data_or_names: OmniglotData | Sequence[str]) -> list[str]:
    return list(data_or_names.names if isinstance(data_or_names, OmniglotData) else data_or_names)


def vinyals_split(names: OmniglotData | Sequence[str]) -> dict[str, list[int]]:
    """The Vinyals et al. (2016) split of characters, from their names alone.

    :param names: ``"Alphabet/characterNN"`` names (or an :class:`OmniglotData`).
    :returns: ``{"train", "val", "trainval", "test"}`` -> sorted indices into ``names``. On the
        full data: 1,028 / 172 / 1,200 / 423 characters.
    :raises DataError: a malformed name, or full-size data whose counts differ from the split's.
    """
    names = _names_of(names)
    parts: dict[str, list[int]] = {"train": [], "val": [], "trainval": [], "test": []}
    for i, name in enumerate(names):
        alphabet, sep, char = name.partition("/")
        if not sep or not alphabet or "/" in char or not char.startswith("character"):
            raise DataError(f"vinyals_split: expected names 'Alphabet/characterNN', got {name!r}")
        if alphabet in VINYALS_TEST_ALPHABETS or name in VINYALS_TEST_CHARACTERS:
            parts["test"].append(i)
        elif alphabet in VINYALS_VAL_ALPHABETS:
            parts["val"].append(i)
            parts["trainval"].append(i)
        else:
            parts["train"].append(i)
            parts["trainval"].append(i)
    parts["trainval"].sort()
    if len(names) == NUM_CHARACTERS:
        counts = {k: len(v) for k, v in parts.items()}
        if counts != VINYALS_COUNTS:
            raise DataError(
                f"vinyals_split: the characters split into {counts}, expected {VINYALS_COUNTS}; "
                f"this is not the canonical Omniglot (alphabet names differ?): {_REDOWNLOAD}"
            )
    return parts


def lake_split(data: OmniglotData) -> dict[str, list[int]]:
    """Lake et al.'s split: ``{"background": [...], "evaluation": [...]}`` character indices."""
    bg = data.background.tolist()
    return {
        "background": [i for i, b in enumerate(bg) if b],
        "evaluation": [i for i, b in enumerate(bg) if not b],
    }


@dataclass
class ClassPool:
    """The classes one split part offers: each rotation of a character is its own class.

    - ``images``: uint8 ``[C, 20, S, S]``, rotations applied, ink = 255.
    - ``names``: ``C`` names ``"Alphabet/characterNN/rotRRR"`` (the split files' naming), in
      character order then rotation order.
    """

    images: Tensor
    names: list[str]

    def __post_init__(self) -> None:
        if (
            self.images.dtype != torch.uint8
            or self.images.dim() != 4
            or self.images.shape[0] != len(self.names)
        ):
            raise DataError(
                f"ClassPool.images: expected uint8 [{len(self.names)}, drawings, S, S], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def drawings(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


_PARTS = {"vinyals": ("train", "val", "trainval", "test"), "lake": ("background", "evaluation")}


def class_pool(
    data: OmniglotData,
    split: str = "vinyals",
    part: str = "train",
    rotations: Sequence[int] = ROTATIONS,
) -> ClassPool:
    """The classes of one split part, each character in each of ``rotations``.

    ``rot090`` is the drawing turned 90 degrees counter-clockwise (``torch.rot90`` with ``k=1`` on
    ``(H, W)``), ``rot180`` 180 degrees, ``rot270`` 270 degrees counter-clockwise.

    :param split: ``"vinyals"`` (parts train/val/trainval/test) or ``"lake"``
        (background/evaluation).
    :returns: :class:`ClassPool`, ``images`` uint8 ``[num_chars * len(rotations), 20, S, S]``.
    """
    if split not in _PARTS:
        raise ProtocolError(f"unknown split {split!r}; known: {', '.join(_PARTS)}")
    if part not in _PARTS[split]:
        raise ProtocolError(
            f"split {split!r} has no part {part!r}; its parts: {', '.join(_PARTS[split])}"
        )
    rotations = tuple(rotations)
    if (
        not rotations
        or any(r not in ROTATIONS for r in rotations)
        or len(set(rotations)) != len(rotations)
    ):
        raise ProtocolError(f"rotations must be distinct values of {ROTATIONS}, got {rotations}")
    chars = vinyals_split(data)[part] if split == "vinyals" else lake_split(data)[part]
    base = data.images[torch.as_tensor(chars, dtype=torch.long)]  # c 20 S S
    rotated = torch.stack([torch.rot90(base, r // 90, dims=(-2, -1)) for r in rotations], dim=1)
    names = [f"{data.names[i]}/rot{r:03d}" for i in chars for r in rotations]
    return ClassPool(rotated.reshape(-1, *base.shape[1:]).contiguous(), names)


# ----------------------------------------------------------------------------- download
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, dest: Path, expected_md5: str, progress: bool) -> None:
    """``url`` -> ``dest`` via a temp file in the same folder, renamed only once its MD5 is right."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    size = r.headers.get("Content-Length")
                    with tqdm(
                        total=int(size) if size else None, desc=dest.name, unit="B",
                        unit_scale=True, disable=not progress,
                    ) as bar:  # fmt: skip
                        for block in iter(lambda: r.read(1 << 20), b""):
                            f.write(block)
                            h.update(block)
                            bar.update(len(block))
            except (urllib.error.URLError, OSError, HTTPException, ValueError) as e:
                raise DataError(
                    f"could not download {url} ({e}). Download it by hand into {dest.parent} "
                    f"(the canonical zips are at {CANONICAL_URL}), then pass --data-root "
                    f"{dest.parent} or set PYRO_META_DATA={dest.parent}."
                ) from e
            f.flush()
            os.fsync(f.fileno())
        got = h.hexdigest()
        if got != expected_md5:
            raise DataError(
                f"{dest.name} downloaded from {url} has MD5 {got}, expected {expected_md5}; the "
                f"download is damaged or not the canonical file. It was deleted; try again."
            )
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 -> what the umask gives any new file
        os.replace(tmp, dest)
        tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def download_omniglot(
    root: str | os.PathLike,
    base_url: str = CANONICAL_URL,
    md5: Mapping[str, str] = CANONICAL_MD5,
    progress: bool = True,
) -> Path:
    """Download ``images_background.zip`` and ``images_evaluation.zip`` into ``root``.

    Each file is fetched with urllib (``https://``, ``http://`` or ``file://``) from
    ``base_url + name`` into a temp file, checked against ``md5[name]`` and only then renamed into
    place. Files already there with the right MD5 are kept.

    :param md5: ``{file name: md5 hex}``, e.g. :data:`CANONICAL_MD5`.
    :returns: ``root``, ready to pass as ``data_root``.
    :raises DataError: a network failure (with the URL and how to download by hand) or an MD5
        mismatch (naming the file, expected and got; the bad file is deleted).
    """
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the download folder {root} ({e}); pick a writable --root"
        ) from e
    for half in HALVES:
        name = f"{half}.zip"
        if name not in md5:
            raise DataError(
                f"download_omniglot: md5 has no entry for {name}; got keys {sorted(md5)}"
            )
        dest = root / name
        if dest.is_file() and _md5(dest) == md5[name]:
            continue
        _fetch(base_url.rstrip("/") + "/" + name, dest, md5[name], progress)
    return root
