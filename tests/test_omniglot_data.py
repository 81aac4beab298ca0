"""Omniglot loading, caching, downloading, the Vinyals/Lake splits and the episode sampler.

Most tests run on a tiny Omniglot-layout dataset written here; the split facts are also checked
against the real data in ../shared/data/omniglot when it is there.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import HAVE_REAL_OMNIGLOT, REAL_OMNIGLOT
from omniglot_fixture import drawings, write_omniglot

from pyro_meta.tasks import omniglot as om
from pyro_meta.tasks.episodes import EpisodeSampler, fixed_episodes
from pyro_meta.tasks.omniglot import (
    ClassPool,
    DataError,
    class_pool,
    default_cache_dir,
    download_omniglot,
    find_omniglot,
    lake_split,
    load_omniglot,
    omniglot_characters,
    vinyals_split,
)
from pyro_meta.tasks.regression import ProtocolError

REAL = REAL_OMNIGLOT
# alphabet -> number of characters, per half; real alphabet names so the Vinyals split applies
LAYOUT = {
    "images_background": {"Hebrew": 2, "Angelic": 3},
    "images_evaluation": {"Tengwar": 2, "Gurmukhi": 1},
}
NAMES = [
    "Angelic/character01", "Angelic/character02", "Angelic/character03",
    "Hebrew/character01", "Hebrew/character02",
    "Gurmukhi/character01", "Tengwar/character01", "Tengwar/character02",
]  # fmt: skip


# ----------------------------------------------------------------------------- tiny dataset
@functools.lru_cache(maxsize=1)
def _drawings() -> dict[str, tuple[bytes, torch.Tensor]]:
    """zip member -> (1-bit PNG bytes, bool [105, 105] True = white background)."""
    return drawings(LAYOUT)


def make_tiny(
    root: Path,
    form: str = "zip",
    drop: str | None = None,
    stored: bool = False,
    override: dict[str, bytes] | None = None,
) -> Path:
    """Write the tiny dataset into ``root`` (``form`` "zip" or "folder"), without member ``drop``,
    with the PNG bytes of the members in ``override`` replaced."""
    return write_omniglot(root, LAYOUT, form, drop, stored, override, made=_drawings())


def expected_105() -> torch.Tensor:
    """What load_omniglot(image_size=105) must return for the tiny data: uint8 [8, 20, 105, 105]."""
    by_char: dict[str, list[torch.Tensor]] = {}
    for member, (_, white) in sorted(_drawings().items()):
        _, alphabet, char, _ = member.split("/")
        by_char.setdefault(f"{alphabet}/{char}", []).append((~white).to(torch.uint8) * 255)
    return torch.stack([torch.stack(by_char[n]) for n in NAMES])


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny(tmp_path / "data")


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch, tmp_path):
    """Never read or write the real user's cache or data settings."""
    monkeypatch.delenv("PYRO_META_DATA", raising=False)
    monkeypatch.setenv("PYRO_META_CACHE", str(tmp_path / "user_cache"))


# ----------------------------------------------------------------------------- loading
def test_load_zip_shapes_inversion_and_order(tiny, tmp_path):
    data = load_omniglot(tiny, image_size=105, cache_dir=tmp_path / "c", progress=False)
    assert data.names == NAMES
    assert data.images.dtype == torch.uint8 and data.images.shape == (8, 20, 105, 105)
    assert data.background.tolist() == [True] * 5 + [False] * 3
    # ink = 255, background = 0, drawing d is drawer d + 1 (members were written unsorted)
    assert torch.equal(data.images, expected_105())
    assert lake_split(data) == {"background": [0, 1, 2, 3, 4], "evaluation": [5, 6, 7]}


def test_resize_to_28(tiny, tmp_path):
    data = load_omniglot(tiny, image_size=28, cache_dir=tmp_path / "c", progress=False)
    assert data.images.shape == (8, 20, 28, 28) and data.images.dtype == torch.uint8
    assert data.image_size == 28
    # antialiased: the ink fraction (~10%) survives the resize instead of being aliased away
    ink = expected_105().float().mean() / 255
    assert abs(float(data.images.float().mean() / 255) - float(ink)) < 0.01
    assert int(data.images.min()) == 0 and 0 < int(data.images.max()) <= 255


def test_second_load_comes_from_cache(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    first = load_omniglot(tiny, image_size=28, cache_dir=cache, progress=False)
    files = list(cache.iterdir())
    assert (
        len(files) == 1 and files[0].name.startswith("omniglot-28px-") and files[0].suffix == ".pt"
    )

    def boom(*args, **kwargs):
        raise AssertionError("decoded again although a valid cache exists")

    monkeypatch.setattr(om, "_decode_sources", boom)
    again = load_omniglot(tiny, image_size=28, cache_dir=cache, progress=False)
    assert torch.equal(again.images, first.images) and again.names == first.names
    assert torch.equal(again.background, first.background)
    with pytest.raises(AssertionError, match="decoded again"):  # other size: its own cache file
        load_omniglot(tiny, image_size=14, cache_dir=cache, progress=False)


def test_cache_fingerprint_follows_the_sources(tmp_path):
    cache = tmp_path / "c"
    first = load_omniglot(
        make_tiny(tmp_path / "a"), image_size=105, cache_dir=cache, progress=False
    )
    # an extra file that is no drawing changes no pixels: same fingerprint, the cache is reused
    root = make_tiny(tmp_path / "b")
    with zipfile.ZipFile(root / "images_evaluation.zip", "a") as z:
        z.writestr("images_evaluation/README.txt", "not a drawing")
    load_omniglot(root, image_size=105, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.pt"))) == 1
    # other pixels in one drawing -> other CRC -> other fingerprint -> its own cache file
    members = list(_drawings())
    root = make_tiny(tmp_path / "d", override={members[0]: _drawings()[members[1]][0]})
    changed = load_omniglot(root, image_size=105, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.pt"))) == 2
    assert not torch.equal(changed.images, first.images)


def test_default_cache_dir_is_used(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_META_CACHE", str(tmp_path / "pc"))
    load_omniglot(tiny, image_size=14, progress=False)
    assert len(list((tmp_path / "pc" / "omniglot").glob("omniglot-14px-*.pt"))) == 1
    assert not list(tiny.rglob("*.pt"))  # never written into the data root


def test_extracted_folders(tmp_path):
    folder = make_tiny(tmp_path / "folder", form="folder")
    data = load_omniglot(folder, image_size=105, cache_dir=tmp_path / "c", progress=False)
    assert data.names == NAMES and torch.equal(data.images, expected_105())
    # mixed: background as a zip, evaluation extracted, under an omniglot/ subfolder
    mixed = make_tiny(tmp_path / "mixed" / "omniglot")
    (mixed / "images_evaluation.zip").unlink()
    make_tiny(tmp_path / "tmp_folder", form="folder")
    (tmp_path / "tmp_folder" / "images_evaluation").rename(mixed / "images_evaluation")
    assert find_omniglot(tmp_path / "mixed") == mixed
    data = load_omniglot(
        tmp_path / "mixed", image_size=105, cache_dir=tmp_path / "c2", progress=False
    )
    assert torch.equal(data.images, expected_105())


def test_omniglot_characters_lists_without_decoding(tiny, monkeypatch):
    monkeypatch.setattr(om, "_decode_png", None)  # any decode would fail
    assert omniglot_characters(tiny) == NAMES


# ----------------------------------------------------------------------------- bad data
def test_missing_data_root_says_where_and_how(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        find_omniglot(empty)
    msg = str(e.value)
    assert str(empty) in msg and str(empty / "omniglot") in msg
    assert "pyro-meta download omniglot --root" in msg and "PYRO_META_DATA" in msg
    assert "github.com/brendenlake/omniglot" in msg
    with pytest.raises(DataError, match="lacks images_evaluation.zip"):
        (empty / "images_background.zip").write_bytes(b"")
        find_omniglot(empty)
    # nothing anywhere: every place looked is named
    with pytest.raises(DataError) as e:
        load_omniglot(progress=False)
    msg = str(e.value)
    assert str(default_cache_dir()) in msg and "pyro-meta download omniglot" in msg


def test_explicit_root_does_not_fall_through(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_META_DATA", str(tiny))  # valid, but an explicit root wins
    with pytest.raises(DataError, match="given data root"):
        find_omniglot(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_crc", "no_top_folder", "bad_png"])
def test_damaged_zip(tmp_path, damage):
    root = make_tiny(tmp_path / "data", stored=True)
    z = root / "images_background.zip"
    raw = z.read_bytes()
    if damage == "garbage":
        z.write_bytes(bytes((i * 37 + i // 7) % 256 for i in range(5000)))
    elif damage == "truncated":
        z.write_bytes(raw[: len(raw) // 2])
    elif damage == "bad_crc":
        with zipfile.ZipFile(z) as zf:
            info = zf.infolist()[3]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        pos = start + info.file_size // 2
        z.write_bytes(raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1 :])
    elif damage == "no_top_folder":
        with zipfile.ZipFile(z, "w") as zf:
            zf.writestr("omniglot/Hebrew/character01/0001_01.png", b"x")
    elif damage == "bad_png":
        with zipfile.ZipFile(z, "a") as zf:
            zf.writestr("images_background/Zulu/character01/9999_01.png", b"not a png")
            for d in range(2, 21):
                zf.writestr(
                    f"images_background/Zulu/character01/9999_{d:02d}.png",
                    _drawings()[next(iter(_drawings()))][0],
                )
    with pytest.raises(DataError) as e:
        load_omniglot(root, image_size=28, cache_dir=tmp_path / "c", progress=False)
    msg = str(e.value)
    assert "images_background.zip" in msg and "re-download" in msg
    expect = {
        "no_top_folder": "top folder images_background/",
        "bad_png": "not a readable PNG",
        "bad_crc": "cannot read",
        "garbage": "not a readable zip",
        "truncated": "not a readable zip",
    }
    assert expect[damage] in msg


def test_character_with_19_drawings(tmp_path):
    member = "images_background/Hebrew/character02/0002_07.png"
    assert member in _drawings()
    root = make_tiny(tmp_path / "data", drop=member)
    with pytest.raises(
        DataError, match=r"Hebrew/character02 has 19 drawing\(s\).*missing drawers \[7\]"
    ):
        load_omniglot(root, cache_dir=tmp_path / "c", progress=False)
    folder = make_tiny(tmp_path / "folder", form="folder", drop=member)
    with pytest.raises(DataError, match="Hebrew/character02 has 19"):
        omniglot_characters(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_format", "bit_flip", "empty"])
def test_damaged_cache_is_ignored_and_rebuilt(tiny, tmp_path, damage):
    cache = tmp_path / "c"
    good = load_omniglot(tiny, image_size=14, cache_dir=cache, progress=False)
    (path,) = cache.glob("*.pt")
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":  # a half-written file
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        obj = torch.load(path, weights_only=True)
        if damage == "wrong_format":
            obj["format"] = 999
        else:  # loadable but the pixels changed: the checksum catches it
            obj["images"] = obj["images"].clone()
            obj["images"][0, 0, 0, 0] ^= 1
        torch.save(obj, path)
    with pytest.warns(UserWarning, match="invalid Omniglot cache"):
        again = load_omniglot(tiny, image_size=14, cache_dir=cache, progress=False)
    assert torch.equal(again.images, good.images)
    assert [p.name for p in cache.iterdir()] == [path.name]  # replaced, no temp files left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is valid
        load_omniglot(tiny, image_size=14, cache_dir=cache, progress=False)


# ----------------------------------------------------------------------------- discovery
def test_discovery_order(tmp_path, monkeypatch):
    a = make_tiny(tmp_path / "a")  # files directly in the root
    b = make_tiny(tmp_path / "b" / "omniglot")  # in an omniglot/ subfolder
    monkeypatch.setenv("PYRO_META_DATA", str(a))
    monkeypatch.setenv("PYRO_META_CACHE", str(tmp_path / "b"))
    assert find_omniglot() == a
    assert find_omniglot(tmp_path / "b") == b  # the argument comes first
    monkeypatch.delenv("PYRO_META_DATA")
    assert find_omniglot() == b  # then the cache dir
    monkeypatch.setenv("PYRO_META_DATA", str(tmp_path / "empty"))
    with pytest.warns(UserWarning, match="empty"):  # a wrong PYRO_META_DATA is not hidden
        assert find_omniglot() == b


def test_default_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_META_CACHE", str(tmp_path / "p"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_cache_dir() == tmp_path / "p"
    monkeypatch.delenv("PYRO_META_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "pyro_meta"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "h" / ".cache" / "pyro_meta"


# ----------------------------------------------------------------------------- download
def _md5s(root: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in root.glob("*.zip")}


def test_download_md5_mismatch_leaves_nothing(tiny, tmp_path):
    md5 = _md5s(tiny)
    md5["images_background.zip"] = "0" * 32
    dest = tmp_path / "dl"
    with pytest.raises(DataError) as e:
        download_omniglot(dest, base_url=tiny.as_uri(), md5=md5, progress=False)
    msg = str(e.value)
    assert "images_background.zip" in msg and "0" * 32 in msg
    assert _md5s(tiny)["images_background.zip"] in msg  # what came
    assert list(dest.iterdir()) == []  # neither the bad file nor a temp file


def test_download_file_url_and_no_redownload(tiny, tmp_path):
    dest = download_omniglot(
        tmp_path / "dl", base_url=tiny.as_uri() + "/", md5=_md5s(tiny), progress=False
    )
    assert dest == tmp_path / "dl" and _md5s(dest) == _md5s(tiny)
    assert sorted(p.name for p in dest.iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
    # files with the right MD5 are kept: an unreachable URL is never contacted
    download_omniglot(dest, base_url="http://127.0.0.1:1/nothing", md5=_md5s(tiny), progress=False)
    assert (
        load_omniglot(dest, image_size=105, cache_dir=tmp_path / "c", progress=False).names == NAMES
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


def test_download_over_http_on_loopback(tiny, tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tiny))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        dest = download_omniglot(tmp_path / "dl", base_url=url, md5=_md5s(tiny), progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert _md5s(dest) == _md5s(tiny)


def test_download_network_failure(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/omniglot"
    with pytest.raises(DataError) as e:
        download_omniglot(tmp_path / "dl", base_url=url, progress=False)
    msg = str(e.value)
    assert f"{url}/images_background.zip" in msg and "by hand" in msg and "PYRO_META_DATA" in msg
    assert list((tmp_path / "dl").iterdir()) == []
    with pytest.raises(DataError, match="could not download"):
        download_omniglot(tmp_path / "dl", base_url=(tmp_path / "missing").as_uri(), progress=False)


# ----------------------------------------------------------------------------- splits and pools
def test_vinyals_split_facts_on_names():
    names = [
        "Gurmukhi/character41", "Gurmukhi/character42", "Gurmukhi/character45", "Gurmukhi/character46",
        "Hebrew/character01", "Tengwar/character01", "ULOG/character03", "Angelic/character01",
        "Mkhedruli_(Georgian)/character02", "Syriac_(Serto)/character01",
    ]  # fmt: skip
    split = vinyals_split(names)
    assert split["train"] == [0, 3, 7]
    assert split["val"] == [4, 8]
    assert split["trainval"] == [0, 3, 4, 7, 8]
    assert split["test"] == [1, 2, 5, 6, 9]
    with pytest.raises(DataError, match="Alphabet/characterNN"):
        vinyals_split(["Hebrew-character01"])


def test_class_pool_rotations_and_parts(tiny, tmp_path):
    data = load_omniglot(tiny, image_size=105, cache_dir=tmp_path / "c", progress=False)
    pool = class_pool(data, "vinyals", "train")  # Angelic x3 + Gurmukhi x1
    assert pool.num_classes == 16 and pool.images.shape == (16, 20, 105, 105)
    assert pool.names[:5] == [
        "Angelic/character01/rot000", "Angelic/character01/rot090", "Angelic/character01/rot180",
        "Angelic/character01/rot270", "Angelic/character02/rot000",
    ]  # fmt: skip
    base = data.images[0]
    for k in range(4):
        assert torch.equal(pool.images[k], torch.rot90(base, k, dims=(-2, -1)))
    # rot090 is counter-clockwise: ink in the top-right corner moves to the top-left
    img = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    img[0, 0, 0, 2] = 255
    one = om.OmniglotData(img, ["Angelic/character01"], torch.tensor([True]))
    turned = class_pool(one, "lake", "background", rotations=(90,)).images[0, 0]
    assert int(turned[0, 0]) == 255 and int(turned.sum()) == 255
    assert class_pool(data, "vinyals", "val").num_classes == 8
    assert class_pool(data, "vinyals", "test").num_classes == 8
    assert class_pool(data, "vinyals", "trainval").num_classes == 24
    assert class_pool(data, "lake", "evaluation", rotations=(0,)).names == [
        n + "/rot000" for n in NAMES[5:]
    ]
    with pytest.raises(ProtocolError, match="no part 'test'"):
        class_pool(data, "lake", "test")
    with pytest.raises(ProtocolError, match="unknown split"):
        class_pool(data, "triantafillou", "train")
    with pytest.raises(ProtocolError, match="rotations"):
        class_pool(data, rotations=(45,))


needs_real = pytest.mark.real_data  # skipped by conftest, with the data root named, when it is absent
PARTS = {"train": 4112, "val": 688, "trainval": 4800, "test": 1692}


@needs_real
def test_vinyals_split_equals_the_split_files():
    """From the zips' listings alone (no decoding), so this is fast."""
    names = omniglot_characters(REAL)
    assert len(names) == 1623
    split = vinyals_split(names)
    for part, count in PARTS.items():
        classes = {f"{names[i]}/rot{r:03d}" for i in split[part] for r in om.ROTATIONS}
        assert len(classes) == count, part
        expected = set((REAL / "splits" / "vinyals" / f"{part}.txt").read_text().split())
        assert classes == expected, f"{part}: {sorted(classes ^ expected)[:5]}"


@pytest.fixture(scope="session")
def real_data(tmp_path_factory):
    if not HAVE_REAL_OMNIGLOT:
        pytest.skip(f"the real Omniglot is not at {REAL}")
    return load_omniglot(
        REAL, image_size=28, cache_dir=tmp_path_factory.mktemp("omniglot_cache"), progress=False
    )


@needs_real
def test_real_data_pools(real_data):
    """About 6-9 s (the first decode of 32,460 PNGs), under the 30 s that would make it slow."""
    assert real_data.images.shape == (1623, 20, 28, 28) and real_data.images.dtype == torch.uint8
    assert {k: len(v) for k, v in lake_split(real_data).items()} == {
        "background": 964,
        "evaluation": 659,
    }
    # mostly background (0) with ~1/5 ink after antialiasing
    assert 0.05 < float(real_data.images.float().mean() / 255) < 0.2
    for part, count in PARTS.items():
        pool = class_pool(real_data, "vinyals", part)
        assert pool.num_classes == count and pool.images.shape == (count, 20, 28, 28)
        assert set(pool.names) == set(
            (REAL / "splits" / "vinyals" / f"{part}.txt").read_text().split()
        )


# ----------------------------------------------------------------------------- episodes
def coded_pool(num_classes: int = 30, size: int = 4) -> ClassPool:
    """A pool whose pixels say which class and drawing they are: pixel (0,0) = class, (0,1) = drawing."""
    images = torch.zeros(num_classes, 20, size, size, dtype=torch.uint8)
    images[:, :, 0, 0] = torch.arange(num_classes, dtype=torch.uint8)[:, None]
    images[:, :, 0, 1] = torch.arange(20, dtype=torch.uint8)
    return ClassPool(images, [f"A/character{c:02d}/rot000" for c in range(num_classes)])


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = (x * 255).round().long()
    return v[..., 0, 0, 0], v[..., 0, 0, 1]  # class, drawing: [T, N]


def test_episode_shapes_labels_and_distinctness():
    ways, shots, queries, T = 5, 2, 3, 64
    batch = next(EpisodeSampler(coded_pool(), ways, shots, queries, T, seed=0))
    assert (
        batch.x_support.shape == (T, ways * shots, 1, 4, 4)
        and batch.x_support.dtype == torch.float32
    )
    assert batch.x_query.shape == (T, ways * queries, 1, 4, 4)
    assert batch.y_support.dtype == torch.int64 and batch.y_support.shape == (T, ways * shots)
    assert 0 <= float(batch.x_support.min()) and float(batch.x_query.max()) <= 1
    # class-major: class 0's items first, so each label exactly shots / queries times
    assert torch.equal(batch.y_support, torch.arange(ways).repeat_interleave(shots).expand(T, -1))
    assert torch.equal(batch.y_query, torch.arange(ways).repeat_interleave(queries).expand(T, -1))
    classes = batch.info["classes"]
    assert classes.shape == (T, ways) and classes.dtype == torch.int64
    assert all(len(set(row)) == ways for row in classes.tolist())  # distinct classes per task
    cs, ds = decode(batch.x_support)
    cq, dq = decode(batch.x_query)
    assert torch.equal(cs, classes.gather(1, batch.y_support)) and torch.equal(
        cq, classes.gather(1, batch.y_query)
    )
    for t in range(T):
        for label in range(ways):
            drawings = (
                ds[t][batch.y_support[t] == label].tolist()
                + dq[t][batch.y_query[t] == label].tolist()
            )
            assert len(set(drawings)) == shots + queries  # support and query drawings distinct


def test_episodes_are_uniform():
    batch = next(EpisodeSampler(coded_pool(10), 5, 1, 1, 4000, seed=1))
    chosen = torch.bincount(batch.info["classes"].flatten(), minlength=10)
    assert (chosen - 2000).abs().max() < 150  # each class in half the tasks; binomial sd ~32
    first = torch.bincount(batch.info["classes"][:, 0], minlength=10)
    assert (first - 400).abs().max() < 80  # labels are in random order; sd ~19
    _, drawings = decode(batch.x_support)
    assert (torch.bincount(drawings.flatten(), minlength=20) - 1000).abs().max() < 150


def test_sampler_seeded_and_resumable():
    pool = coded_pool()
    a, b = EpisodeSampler(pool, 5, 1, 2, 8, seed=3), EpisodeSampler(pool, 5, 1, 2, 8, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    first = next(a)
    torch.manual_seed(456)
    assert torch.equal(first.info["classes"], next(b).info["classes"])
    assert not torch.equal(
        first.info["classes"], next(EpisodeSampler(pool, 5, 1, 2, 8, seed=4)).info["classes"]
    )
    assert iter(a) is a and a.meta_batch == 8 and (a.ways, a.shots, a.queries) == (5, 1, 2)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    c = EpisodeSampler(pool, 5, 1, 2, 8, seed=99)
    c.load_state_dict(state)
    for want in expected:
        got = next(c)
        assert torch.equal(got.x_support, want.x_support) and torch.equal(got.x_query, want.x_query)
        assert torch.equal(got.info["classes"], want.info["classes"])
    with pytest.raises(ProtocolError, match="ways saved 5 but this sampler has 4"):
        EpisodeSampler(pool, 4, 1, 2, 8, seed=0).load_state_dict(state)


def test_fixed_episodes_identical_everywhere():
    pool = coded_pool()
    one = fixed_episodes(pool, num_tasks=6, ways=5, shots=1, queries=4, seed=7)
    torch.manual_seed(1)
    two = fixed_episodes(pool, num_tasks=6, ways=5, shots=1, queries=4, seed=7)
    for f in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(one, f), getattr(two, f))
    assert one.num_tasks == 6
    # pinned: the same tasks on every machine (torch's CPU generator is platform independent)
    assert one.info["classes"][:2].tolist() == PINNED_CLASSES


PINNED_CLASSES = [[19, 29, 17, 26, 20], [26, 25, 23, 11, 28]]


def test_episode_errors():
    big = ClassPool(
        torch.zeros(1692, 20, 1, 1, dtype=torch.uint8),
        [f"x/character{i}/rot000" for i in range(1692)],
    )
    with pytest.raises(
        ProtocolError, match="asked for 2000-way tasks but the pool has 1692 classes"
    ):
        EpisodeSampler(big, 2000, 1, 1, 4, seed=0)
    with pytest.raises(ProtocolError, match="5 shots \\+ 16 queries = 21 .* 20 drawings"):
        fixed_episodes(big, 10, 5, 5, 16, seed=0)
    for bad in ({"ways": 0}, {"shots": 0}, {"queries": -1}, {"meta_batch": 0}, {"ways": 2.5}):
        kw = {"ways": 5, "shots": 1, "queries": 1, "meta_batch": 2, **bad}
        with pytest.raises(ProtocolError, match=f"{next(iter(bad))} must be a positive integer"):
            EpisodeSampler(big, seed=0, **kw)
    with pytest.raises(ProtocolError, match="num_tasks must be a positive integer"):
        fixed_episodes(big, 0, 5, 1, 1, seed=0)
    with pytest.raises(ProtocolError, match="expected a ClassPool"):
        EpisodeSampler(torch.zeros(3, 20, 2, 2), 2, 1, 1, 1, seed=0)
