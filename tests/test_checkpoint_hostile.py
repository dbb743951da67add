"""Hostile checkpoint files: crafted headers, indexes and metadata, sizes that lie, non-regular files and
fuzzed bytes all end in a CheckpointError (CheckpointCorrupt for damage), in bounded time and memory;
`ckpt verify` reports every file and `load(fallback=True)` moves past each of them."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog.agent.cli import main as cli_main
from flightlog.checkpoint import ModelCheckpointer
from flightlog.proto.checkpoint import CheckpointReader, verify_file, write_container
from flightlog.proto.checkpoint.format import (
    SKIPPABLE_MAGIC,
    TensorInfo,
    encode_footer,
    gzip_trailer_member,
)
from flightlog.proto.errors import CheckpointCorrupt, CheckpointError

MEMORY_BOUND = 64 << 20  # tracemalloc peak per hostile file: generous for a noisy shared machine
TIME_BOUND = 5.0  # seconds per hostile file, ditto


# --- crafting files ------------------------------------------------------------------------------------


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(data)


def _prefix(head: bytes) -> bytes:
    return struct.pack("<Q", len(head)) + head


def _tensor_head(tensors: dict[str, Any], meta: dict[str, str] | None = None) -> bytes:
    obj: dict[str, Any] = {"__metadata__": meta} if meta else {}
    obj.update(tensors)
    return json.dumps(obj).encode()


def seal_zstd(head: bytes, data: bytes = b"", *, blobs: list[tuple[bytes, int]] | None = None,
              header_frame: bytes | None = None, codec: str = "zstd",
              edit: Callable[[dict[str, Any]], Any] | None = None, index: bytes | None = None) -> bytes:
    """A zstd-container checkpoint whose checksums and trailer are all valid, around whatever header,
    frames and index it is given: only the parsers stand between it and the reader's internals."""
    prefix = _prefix(head)
    payload = header_frame if header_frame is not None else _zstd(prefix)
    frames: list[list[Any]] = [[0, len(payload), 0, len(prefix)]]
    u = len(prefix)
    for blob, n in blobs if blobs is not None else ([(_zstd(data), len(data))] if data else []):
        frames.append([len(payload), len(blob), u, n])
        payload += blob
        u += n
    idx: dict[str, Any] = {"v": 1, "codec": codec, "level": 1, "header_len": len(prefix), "total": u,
                           "frames": frames}
    if edit is not None:
        edit(idx)
    raw = index if index is not None else json.dumps(idx).encode()
    tail = raw + encode_footer(len(payload), xxhash.xxh3_128(payload).digest(), raw)
    return payload + struct.pack("<II", SKIPPABLE_MAGIC, len(tail)) + tail


def _one_f32() -> bytes:
    return _tensor_head({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(idx: dict[str, Any]) -> None:
        obj: Any = idx
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return edit


def _nested(n: int) -> str:
    return "[" * n + "]" * n


def _grouped(width: int) -> bytes:
    """A byte-grouped file with a data frame of the given element width (12 bytes of U8 in all)."""
    prefix = _prefix(_tensor_head({"t": {"dtype": "U8", "shape": [12], "data_offsets": [0, 12]}}))
    first = _zstd(prefix)
    frames: list[list[Any]] = [[0, len(first), 0, len(prefix)]]
    if width == 0:  # an empty grouped frame of width 0 ahead of a plain one that carries the data
        blob = _zstd(bytes(12))
        frames += [[len(first), 0, len(prefix), 0, 0, [], 1], [len(first), len(blob), len(prefix), 12]]
    else:
        planes = [_zstd(bytes(12 // width)) for _ in range(width)]
        blob = b"".join(planes)
        frames.append([len(first), len(blob), len(prefix), 12, width, [len(p) for p in planes], 0])
    return _seal_frames(first + blob, frames, len(prefix), len(prefix) + 12, "zstd-bytegroup")


def _seal_frames(payload: bytes, frames: list[list[Any]], header_len: int, total: int, codec: str) -> bytes:
    raw = json.dumps({"v": 1, "codec": codec, "level": 1, "header_len": header_len, "total": total,
                      "frames": frames}).encode()
    tail = raw + encode_footer(len(payload), xxhash.xxh3_128(payload).digest(), raw)
    return payload + struct.pack("<II", SKIPPABLE_MAGIC, len(tail)) + tail


def _lying_frame(declared: int, content: bytes) -> bytes:
    """A zstd frame whose header declares ``declared`` bytes of content but holds ``content`` (one raw block)."""
    block = (len(content) << 3) | 1  # raw block, last
    return (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", declared) + block.to_bytes(3, "little")
            + content)


def _rle_frame(size: int) -> bytes:
    """A genuine zstd frame of ``size`` zero bytes in RLE blocks (4 bytes per 128 KiB; a 1 MiB window)."""
    out = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x50]) + struct.pack("<Q", size))
    left = size
    while left:
        n = min(left, 128 << 10)
        left -= n
        out += ((n << 3) | (1 << 1) | (0 if left else 1)).to_bytes(3, "little") + b"\x00"
    return bytes(out)


def _undeclared_header(claim: int) -> bytes:
    """A header frame that declares no content size (zstd then allocates the whole cap it is given) and
    is big enough for the index's claim to pass the compression-ratio bound."""
    head = _tensor_head({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                        {"pad": os.urandom(4096).hex()})
    frame = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(_prefix(head))

    def claim_more(i: dict[str, Any]) -> None:
        i.update(header_len=claim, total=i["total"] - i["header_len"] + claim)
        i["frames"][0][3] = claim
        i["frames"][1][2] = claim
    return seal_zstd(head, bytes(8), header_frame=frame, edit=claim_more)


HEADER_AND_INDEX_CASES: dict[str, Callable[[], bytes]] = {
    "float offset in the index": lambda: seal_zstd(_one_f32(), bytes(8), edit=_set(["frames", 0, 0], 0.0)),
    "float data offset in the index": lambda: seal_zstd(_one_f32(), bytes(8), edit=lambda i: i["frames"][1].__setitem__(0, float(i["frames"][1][0]))),
    "float length in the index": lambda: seal_zstd(_one_f32(), bytes(8), edit=lambda i: i["frames"][1].__setitem__(1, float(i["frames"][1][1]))),
    "list length in the index": lambda: seal_zstd(_one_f32(), bytes(8), edit=lambda i: i["frames"][1].__setitem__(1, [i["frames"][1][1]])),
    "float total": lambda: seal_zstd(_one_f32(), bytes(8), edit=lambda i: i.__setitem__("total", float(i["total"]))),
    "index is a list": lambda: seal_zstd(_one_f32(), bytes(8), index=b"[1, 2, 3]"),
    "frames is an object": lambda: seal_zstd(_one_f32(), bytes(8), edit=_set(["frames"], {"a": [0, 1, 2, 3]})),
    "frame with five items": lambda: seal_zstd(_one_f32(), bytes(8), edit=lambda i: i["frames"][1].append(2)),
    "format version 2": lambda: seal_zstd(_one_f32(), bytes(8), edit=_set(["v"], 2)),
    "header length 500 MB": lambda: seal_zstd(_one_f32(), bytes(8), edit=lambda i: (
        i.update(header_len=500 << 20, total=i["total"] - i["header_len"] + (500 << 20)),
        i["frames"][0].__setitem__(3, 500 << 20), i["frames"][1].__setitem__(2, 500 << 20))),
    "undeclared header frame, index claims 100 MiB": lambda: _undeclared_header(100 << 20),
    "frame claims more than zstd can hold": lambda: seal_zstd(
        _tensor_head({"t": {"dtype": "U8", "shape": [1 << 40], "data_offsets": [0, 1 << 40]}}),
        blobs=[(_zstd(bytes(8)), 1 << 40)]),
    "float data_offsets": lambda: seal_zstd(_tensor_head({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}), bytes(8)),
    "list data_offsets": lambda: seal_zstd(_tensor_head({"t": {"dtype": "F32", "shape": [2], "data_offsets": [[0], [8]]}}), bytes(8)),
    "string shape": lambda: seal_zstd(_tensor_head({"t": {"dtype": "U8", "shape": "ab", "data_offsets": [0, 2]}}), bytes(2)),
    "list dtype": lambda: seal_zstd(_tensor_head({"t": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}), bytes(8)),
    "huge dims": lambda: seal_zstd(_tensor_head({"t": {"dtype": "U8", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 8]}}), bytes(8)),
    "200 dims": lambda: seal_zstd(_tensor_head({"t": {"dtype": "U8", "shape": [1] * 200, "data_offsets": [0, 1]}}), bytes(1)),
    "metadata holds a number": lambda: seal_zstd(_tensor_head({}, {"k": 1}), b""),  # type: ignore[dict-item]
    "header is a list": lambda: seal_zstd(b"[1]"),
    "header nested 200,000 deep": lambda: seal_zstd(b'{"t":' + _nested(200_000).encode() + b"}"),
    "index nested 200,000 deep": lambda: seal_zstd(_one_f32(), bytes(8), index=json.dumps(
        {"v": 1, "codec": "zstd", "level": 1, "header_len": 0, "total": 0, "frames": []})[:-1].encode()
        + b',"x":' + _nested(200_000).encode() + b"}"),
    "byte-group width 0": lambda: _grouped(0),
    "byte-group width 3": lambda: _grouped(3),
}


@pytest.mark.parametrize("case", sorted(HEADER_AND_INDEX_CASES))
def test_crafted_header_or_index_is_checkpoint_corrupt(tmp_path: Path, case: str, loader: ModelCheckpointer) -> None:
    path = tmp_path / "x.safetensors.zst"
    path.write_bytes(HEADER_AND_INDEX_CASES[case]())
    with _bounded():
        with pytest.raises(CheckpointCorrupt, match=str(path).replace(".", r"\.")):
            verify_file(path)
        with pytest.raises(CheckpointCorrupt):
            _read_everything(path)
        with pytest.raises(CheckpointCorrupt):
            loader.load(str(path))
        assert loader.load(str(path), fallback=True) == (0, 1)  # the registered good one
    code, out, err = _cli(["ckpt", "show", "--registry", str(tmp_path / "none.db"), str(path)])
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith(f"flightlog: error: {path}: ")


def test_declared_frame_content_size_is_checked_before_allocating(tmp_path: Path) -> None:
    """`ckpt show` on a 16 KB file whose header frame declares 500 MB of content."""
    head = _prefix(_one_f32())
    frame = _lying_frame(500_000_000, head + bytes(16_000))
    path = tmp_path / "x.safetensors.zst"
    path.write_bytes(seal_zstd(_one_f32(), bytes(8), header_frame=frame))
    assert path.stat().st_size < 20_000
    with _bounded():
        code, out, err = _cli(["ckpt", "show", "--registry", str(tmp_path / "none.db"), str(path)])
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("flightlog: error: ") and "declares 500000000 bytes" in err


def test_verify_of_a_small_file_declaring_a_huge_tensor_uses_bounded_memory(tmp_path: Path) -> None:
    """A 32 KB file that really decompresses to one 1 GiB tensor (zstd RLE blocks): verify streams it
    through a small window instead of allocating the tensor."""
    n = 1 << 30
    head = _tensor_head({"t": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}})
    path = tmp_path / "x.safetensors.zst"
    path.write_bytes(seal_zstd(head, blobs=[(_rle_frame(n), n)]))
    assert path.stat().st_size < 64 << 10
    with _bounded(seconds=30):  # decoding 1 GiB of RLE is memset-fast; generous on a loaded machine
        verify_file(path)  # a valid file: it must pass, in bounded memory
    code, out, _ = _cli(["ckpt", "verify", "--registry", str(tmp_path / "none.db"), str(path)])
    assert code == 0 and "1 ok, 0 bad" in out


# --- the flightlog metadata, through load, show and verify ---------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A checkpoint directory with one good registered checkpoint (epoch 0, step 1) and its file."""
    d = tmp_path_factory.mktemp("hostile") / "c"
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    with ModelCheckpointer(d, monitor=None, run_id="hostile") as ck:
        p = ck.save(model, 0, 1, opt)
        p.wait()
    yield d, Path(p)


@pytest.fixture(scope="module")
def loader(saved: tuple[Path, Path]) -> Iterator[ModelCheckpointer]:
    with ModelCheckpointer(saved[0], monitor=None, run_id="hostile") as ck:
        yield ck


def _rewrite(src: Path, dest: Path, edit: Callable[[dict[str, Any]], Any], codec: str = "zstd",
             chunk: int = 0) -> None:
    """Rewrite a real checkpoint (valid checksums) with its flightlog metadata edited."""
    with CheckpointReader(src) as r:
        infos = sorted(r.tensors.values(), key=lambda t: t.begin)
        data = bytes(r.read_data())
        meta = dict(r.metadata)
    state = json.loads(meta["flightlog"])
    new = edit(state)
    meta["flightlog"] = new if isinstance(new, str) else json.dumps(state)
    with open(dest, "wb") as f:
        write_container(f, infos, meta, memoryview(data), codec, 1, threads=1, chunk_bytes=chunk)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda s: s.pop(key)


def _tuple_python_rng(s: dict[str, Any]) -> None:
    s["rng"]["python"] = {"__tuple__": [3, "not a state", None]}


META_CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], bool]] = {
    # name: (edit, whether `ckpt verify` can tell without torch)
    "a list": (lambda s: "[1, 2]", True),
    "not JSON": (lambda s: "{", True),
    "missing epoch": (_drop("epoch"), True),
    "string step": (lambda s: s.__setitem__("step", "2"), True),
    "bool epoch": (lambda s: s.__setitem__("epoch", True), True),
    "dangling alias": (lambda s: s.__setitem__("aliases", {"weight2": "no such tensor"}), True),
    "nested 200,000 deep": (lambda s: json.dumps(s)[:-1] + ',"x":' + _nested(200_000) + "}", True),
    "nested 100 deep": (lambda s: s.__setitem__("model_extra", {"x": json.loads(_nested(100))}), True),
    "a list as RNG state": (lambda s: s.__setitem__("rng", [1, 2]), True),
    "bad python RNG state": (_tuple_python_rng, False),
    "bad torch RNG state": (lambda s: s["rng"].__setitem__("torch", 5), False),
    "bad numpy RNG state": (lambda s: s["rng"].__setitem__("numpy", {"__tuple__": ["MT19937", 1]}), False),
    "dangling tensor reference": (lambda s: json.dumps(s).replace('"__tensor__": "@optimizer', '"__tensor__": "@nope', 1), False),
    "dtype that is a function": (lambda s: s["model_extra"].__setitem__("x", {"__dtype__": "load"}), False),
    "object ndarray": (lambda s: s["model_extra"].__setitem__("x", {"__ndarray__": "|O", "shape": [1], "data": [1]}), False),
    "unhashable dict key": (lambda s: s["model_extra"].__setitem__("x", {"__dict__": [[[1], 2]]}), False),
    "tuple of a number": (lambda s: s["model_extra"].__setitem__("x", {"__tuple__": 5}), False),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_bad_flightlog_metadata_is_corrupt_and_fallback_moves_past_it(tmp_path: Path, saved: tuple[Path, Path],
                                                                      case: str) -> None:
    d, good = saved
    edit, proto_checks = META_CASES[case]
    bad = tmp_path / "bad.safetensors.zst"
    _rewrite(good, bad, edit)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = ModelCheckpointer(d, monitor=None, run_id="hostile")
    try:
        with pytest.raises(CheckpointCorrupt, match=str(bad).replace(".", r"\.")):
            ck.load(str(bad), model, opt)
        assert ck.load(str(bad), model, opt, fallback=True) == (0, 1)
    finally:
        ck.close()
    if proto_checks:
        code, out, err = _cli(["ckpt", "show", "--registry", str(tmp_path / "none.db"), str(bad)])
        assert code == 1 and out == "" and err.count("\n") == 1 and str(bad) in err
        code, out, _ = _cli(["ckpt", "verify", "--registry", str(tmp_path / "none.db"), str(bad)])
        assert code == 1 and out.startswith(f"CORRUPT  {bad}: ")


def test_real_metadata_with_infinity_and_nan_still_loads(tmp_path: Path, saved: tuple[Path, Path]) -> None:
    """Python's json writes Infinity/NaN (a plateau scheduler's `best`, a NaN metric): still valid."""
    d, good = saved
    f = tmp_path / "inf.safetensors.zst"
    _rewrite(good, f, lambda s: s.update(metrics={"loss": float("nan")}, model_extra={"best": float("inf")}))
    holder: dict[str, Any] = {}

    class Sink(torch.nn.Linear):
        def load_state_dict(self, sd: Any, strict: bool = True, assign: bool = False) -> Any:
            holder.update(sd)

    with ModelCheckpointer(d, monitor=None) as ck:
        assert ck.load(str(f), Sink(8, 8)) == (0, 1)
    assert holder["best"] == float("inf")


def test_verify_reports_every_file_one_line_each_with_the_path_once(tmp_path: Path,
                                                                    saved: tuple[Path, Path]) -> None:
    _, good = saved
    files = [good]
    for i, case in enumerate(["float offset in the index", "byte-group width 3", "header nested 200,000 deep"]):
        p = tmp_path / f"crafted{i}.safetensors.zst"
        p.write_bytes(HEADER_AND_INDEX_CASES[case]())
        files.append(p)
    listed = tmp_path / "list.safetensors.zst"
    _rewrite(good, listed, lambda s: "[1]")
    files += [listed, tmp_path / "missing.safetensors.zst", tmp_path]
    code, out, _ = _cli(["ckpt", "verify", "--registry", str(tmp_path / "none.db"), *map(str, files)])
    lines = out.splitlines()
    assert code == 1 and len(lines) == len(files) + 1 and lines[-1] == f"1 ok, {len(files) - 1} bad"
    assert lines[0] == f"OK       {good}"
    for line, f in zip(lines[1:], files[1:]):
        assert line.startswith(f"CORRUPT  {f}: ") and line.count(str(f)) == 1, line


# --- non-regular files ---------------------------------------------------------------------------------


_FIFO_SCRIPT = """
import sys
from flightlog.proto.errors import CheckpointError
what, path = sys.argv[1], sys.argv[2]
try:
    if what == "load":
        import torch
        from flightlog.checkpoint import ModelCheckpointer
        with ModelCheckpointer(sys.argv[3], monitor=None, run_id="hostile") as ck:
            print("loaded", ck.load(path, torch.nn.Linear(8, 8), fallback=True))
        with ModelCheckpointer(sys.argv[3], monitor=None, run_id="hostile") as ck:
            ck.load(path, torch.nn.Linear(8, 8))
    else:
        from flightlog.proto.checkpoint import CheckpointReader
        CheckpointReader(path)
except CheckpointError as exc:
    print("refused", type(exc).__name__, exc)
"""


def test_fifo_is_refused_without_hanging(tmp_path: Path, saved: tuple[Path, Path]) -> None:
    d, _ = saved
    fifo = tmp_path / "ckpt-e0000-s000000009.safetensors.zst"
    os.mkfifo(fifo)
    none = str(tmp_path / "none.db")
    runs = {
        "open": [sys.executable, "-c", _FIFO_SCRIPT, "open", str(fifo)],
        "load": [sys.executable, "-c", _FIFO_SCRIPT, "load", str(fifo), str(d)],
        "verify": [sys.executable, "-m", "flightlog.agent.cli", "ckpt", "verify", "--registry", none, str(fifo)],
        "show": [sys.executable, "-m", "flightlog.agent.cli", "ckpt", "show", "--registry", none, str(fifo)],
    }
    for what, argv in runs.items():
        try:  # a regression blocks in open() until a writer appears: the timeout turns that into a failure
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what} of a FIFO hangs")
        text = proc.stdout + proc.stderr
        assert "is a FIFO, not a checkpoint file" in text, (what, text)
        assert "Traceback" not in text, (what, text)
        if what == "load":
            assert "loaded (0, 1)" in text and "refused CheckpointError" in text
        if what in ("verify", "show"):
            assert proc.returncode == 1


@pytest.mark.parametrize("where", ["directory", "/dev/zero", "/dev/null"])
def test_other_non_regular_files_are_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path if where == "directory" else Path(where)
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        CheckpointReader(path)


# --- fuzzing --------------------------------------------------------------------------------------------


def _read_everything(path: Path) -> None:
    """Everything a user can make the reader do with one file."""
    with CheckpointReader(path, verify=False) as r:
        r.check_frames(threads=1)
        r.read_data(verify=True, threads=1)
        for name in list(r.tensors)[:4]:
            r.tensor_bytes(name)
    verify_file(path)  # also checks the flightlog metadata's shape


@contextlib.contextmanager
def _bounded(seconds: float = TIME_BOUND, memory: int = MEMORY_BOUND) -> Iterator[None]:
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.monotonic() - t0
    assert peak < memory, f"peak {peak} bytes"
    assert elapsed < seconds, f"{elapsed:.1f} s"


def _attempt(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with _bounded():
        try:
            _read_everything(path)
        except CheckpointError:
            pass  # the only acceptable failure; anything else propagates and fails the example


@pytest.fixture(scope="module")
def real(saved: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real files from the writer in every codec, in small chunks (many frames, byte-grouped planes)."""
    _, good = saved
    d = tmp_path_factory.mktemp("real")
    out = {}
    for codec in ("zstd", "gzip", "none", "zstd-bytegroup"):
        p = d / codec
        _rewrite(good, p, lambda s: None, codec=codec, chunk=96)
        verify_file(p)
        out[codec] = p.read_bytes()
    return out


def _split(data: bytes, codec: str) -> tuple[bytes, bytes]:
    """A real file's (payload, index JSON)."""
    (payload_len,) = struct.unpack_from("<Q", data, len(data) - (50 if codec == "gzip" else 40) + 8)
    if codec == "none":
        return data[:-40], b""
    if codec == "gzip":
        return data[:payload_len], data[payload_len + 16:-50]
    return data[:payload_len], data[payload_len + 8:-40]


def _reseal(payload: bytes, index: bytes, codec: str) -> bytes:
    """Valid checksums, CRC and trailer around (possibly damaged) payload and index."""
    digest = xxhash.xxh3_128(payload).digest()
    if codec == "none":
        return payload + encode_footer(len(payload), digest, b"")
    tail = index + encode_footer(len(payload), digest, index)
    if codec == "gzip":
        return payload + gzip_trailer_member(tail)
    return payload + struct.pack("<II", SKIPPABLE_MAGIC, len(tail)) + tail


@st.composite
def _byte_edits(draw: Any, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("["), ord('"'), ord("9")]))
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 16))]
    return bytes(out)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False)
                     | st.text(max_size=6), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=8)


def _nodes(doc: Any) -> list[list[Any]]:
    """Every path into a JSON document (iteratively)."""
    out: list[list[Any]] = [[]]
    stack: list[tuple[Any, list[Any]]] = [(doc, [])]
    while stack:
        obj, path = stack.pop()
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for k, v in items:
            out.append(path + [k])
            stack.append((v, path + [k]))
    return out


@st.composite
def _json_edit(draw: Any, doc: Any) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        nodes = _nodes(doc)
        path = draw(st.sampled_from(nodes))
        value = draw(st.one_of(_JSON, st.sampled_from([0, -1, 1.5, 2 ** 63, "", [], {}, [0, 0], "F32", "@nope"])))
        if not path:
            doc = value
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if draw(st.booleans()) or not isinstance(parent, (dict, list)):
            parent[path[-1]] = value
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.insert(path[-1], value)
    return doc


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.data_too_large])
CODECS = ("zstd", "gzip", "none", "zstd-bytegroup")


@_FUZZ
@given(data=st.data(), codec=st.sampled_from(CODECS), reseal=st.booleans())
def test_fuzz_mutated_real_files_give_only_typed_errors(tmp_path: Path, real: dict[str, bytes], data: Any,
                                                         codec: str, reseal: bool) -> None:
    original = real[codec]
    if reseal:  # damage behind valid checksums: the header, frame and index parsers are what is left
        payload, index = _split(original, codec)
        payload = data.draw(_byte_edits(payload))
        if codec != "none" and data.draw(st.booleans()):
            index = data.draw(_byte_edits(index))
        damaged = _reseal(payload, index, codec)
    else:
        damaged = data.draw(_byte_edits(original))
    _attempt(tmp_path / "f", damaged)


@_FUZZ
@given(data=st.data(), codec=st.sampled_from(("zstd", "gzip", "zstd-bytegroup")))
def test_fuzz_index_json_gives_only_typed_errors(tmp_path: Path, real: dict[str, bytes], data: Any, codec: str) -> None:
    payload, index = _split(real[codec], codec)
    doc = data.draw(_json_edit(json.loads(index)))
    _attempt(tmp_path / "f", _reseal(payload, json.dumps(doc).encode(), codec))


@_FUZZ
@given(data=st.data(), which=st.sampled_from(["header", "flightlog"]))
def test_fuzz_header_and_metadata_json_give_only_typed_errors(tmp_path: Path, real: dict[str, bytes],
                                                               data: Any, which: str) -> None:
    with CheckpointReader(_write(tmp_path / "src", real["zstd"])) as r:
        header = json.loads(r.read_range(8, r.header_len))
        body = bytes(r.read_data())
    if which == "header":
        doc = data.draw(_json_edit(header))
    else:
        doc = header
        doc["__metadata__"]["flightlog"] = json.dumps(data.draw(_json_edit(json.loads(header["__metadata__"]["flightlog"]))))
    _attempt(tmp_path / "f", seal_zstd(json.dumps(doc).encode(), body))


@settings(_FUZZ, max_examples=100)  # each example is a whole load: keep CI fast
@given(data=st.data())
def test_fuzz_metadata_through_load_gives_only_typed_errors(tmp_path: Path, saved: tuple[Path, Path],
                                                            loader: ModelCheckpointer, data: Any) -> None:
    _, good = saved
    with CheckpointReader(good) as r:
        state = json.loads(r.metadata["flightlog"])
    doc = data.draw(_json_edit(state))
    bad = tmp_path / "m.safetensors.zst"
    _rewrite(good, bad, lambda s: json.dumps(doc))
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with _bounded():
        try:
            got = loader.load(str(bad), model, opt, restore_rng=False)
        except CheckpointError:
            assert loader.load(str(bad), model, opt, fallback=True) == (0, 1)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            # a well-formed state that does not fit this model or optimizer: torch's load_state_dict
            # says so, as for any mismatched checkpoint. An error from flightlog's own decoding
            # would not come from there.
            assert any("load_state_dict" in f for f in _frames(exc)), exc
        else:
            assert got == (doc["epoch"], doc["step"])


@_FUZZ
@given(blob=st.binary(max_size=4096), magic=st.sampled_from([b"", b"\x28\xb5\x2f\xfd", b"\x1f\x8b", b"\x10\0\0\0\0\0\0\0{"]))
def test_fuzz_random_bytes_give_only_typed_errors(tmp_path: Path, blob: bytes, magic: bytes) -> None:
    _attempt(tmp_path / "f", magic + blob)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _frames(exc: BaseException) -> list[str]:
    import traceback

    return [f.name for f in traceback.extract_tb(exc.__traceback__)]


# --- CLI helper -----------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_crafting_helpers_make_valid_files(tmp_path: Path) -> None:
    """The crafted cases differ from a valid file only where they say (so each tests what it names)."""
    p = _write(tmp_path / "ok", seal_zstd(_one_f32(), bytes(8)))
    assert verify_file(p)
    with CheckpointReader(p) as r:
        assert r.tensors["t"] == TensorInfo("t", "F32", (2,), 0, 8)
    n = 1 << 20
    p = _write(tmp_path / "rle", seal_zstd(_tensor_head({"t": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}),
                                           blobs=[(_rle_frame(n), n)]))
    with CheckpointReader(p) as r:
        assert r.tensor_bytes("t") == bytes(n)
    assert zstandard.ZstdDecompressor().decompress(_lying_frame(3, b"abc")) == b"abc"
