"""Encrypted checkpoints (checkpointing.encryption: aes-256-gcm): bit-exact round trips for every codec,
in-place loading, wrong and missing keys, tampering with every envelope field, frames swapped between
files or reordered, truncation, no plaintext on disk, the key providers (variable, 0600 file, command),
rotation, a real agent writing them, DCP, `ckpt verify`, and a bounded fuzz of the sealed parser."""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from conftest import AgentProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightlog import ExperimentTracker
from flightlog.agent.ckpt_cli import add_subparsers
from flightlog.checkpoint import ModelCheckpointer
from flightlog.proto.checkpoint.crypto import OVERHEAD, SEALED_MAGIC, decode_envelope
from flightlog.proto.checkpoint.format import CODECS, FOOTER, TensorInfo, encode_footer
from flightlog.proto.checkpoint.keys import (
    Key,
    KeyRing,
    KeyUse,
    load_keyring,
    on_key_use,
    parse_keys,
)
from flightlog.proto.checkpoint.reader import CheckpointReader, verify_file
from flightlog.proto.checkpoint.writer import write_container
from flightlog.proto.config import load_config
from flightlog.proto.errors import CheckpointCorrupt, CheckpointError, CheckpointKeyError
from flightlog.proto.events import CheckpointSpec

PATTERN = b"FLIGHTLOG-SECRET-WEIGHT-PATTERN!"  # 32 bytes a grep can find


def _key(key_id: str, seed: int) -> Key:
    return Key(key_id, bytes(np.random.default_rng(seed).integers(0, 256, 32, dtype=np.uint8)))


K1, K2 = _key("k1", 1), _key("k2", 2)
RING = KeyRing([K1])


def _b64(k: Key) -> str:
    return f"{k.key_id}:{base64.b64encode(k.material).decode()}"


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    o = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(4, 16)).sum().backward()
    o.step()
    return m, o


def _bytes(m: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in m.state_dict().items()}


def _write(path: Path, codec: str = "none", key: Key | None = K1, payload: bytes = PATTERN * 2048,
           chunk: int = 16384) -> bytes:
    """A small file written at the format layer: tensor ``w`` holds ``payload`` (U8), in 4 equal chunks."""
    data = memoryview(bytearray(payload))
    with open(path, "wb") as f:
        write_container(f, [TensorInfo("secret_layer.w", "U8", (len(payload),), 0, len(payload))],
                        {"flightlog": json.dumps({"epoch": 1, "step": 2})}, data, codec, 1, threads=2,
                        chunk_bytes=chunk, key=key)
    return payload


def _frames(path: Path) -> list[list[Any]]:
    with CheckpointReader(path, keys=RING) as r:
        return [list(f) for f in r.frames]


def _fix_outer(raw: bytearray) -> bytearray:
    """Recompute the footer's xxh3 and CRC (which need no key) after tampering, as an attacker would, so
    only the authenticated encryption stands between the edit and the reader."""
    payload_len, index_len = struct.unpack_from("<Q", raw, len(raw) - FOOTER.size + 8)[0], \
        struct.unpack_from("<I", raw, len(raw) - 8)[0]
    index = bytes(raw[payload_len:payload_len + index_len])
    digest = xxhash.xxh3_128_digest(bytes(raw[:payload_len]))
    raw[len(raw) - FOOTER.size:] = encode_footer(payload_len, digest, index)
    return raw


def _fix_envelope_crc(raw: bytearray) -> bytearray:
    n = struct.unpack_from("<I", raw, 8)[0]
    struct.pack_into("<I", raw, 12 + n, zlib.crc32(bytes(raw[:12 + n])))
    return raw


def _staged_plaintext(directory: Path, pattern: str = "ckpt-*.buf") -> list[Path]:
    """Staging files in ``directory`` holding anything but zeros."""
    return [p for p in directory.glob(pattern) if p.read_bytes().strip(b"\0")]


def _load_all(path: Path, keys: KeyRing | None = RING) -> bytes:
    with CheckpointReader(path, verify=False, keys=keys) as r:
        return bytes(r.read_data(verify=True))


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_bit_exact_in_place_every_codec(tmp_path: Path, codec: str) -> None:
    m, o = _model(0)
    ck = ModelCheckpointer(tmp_path / "ck", compression=codec, encryption="aes-256-gcm", keys=RING,
                           staging_dir=tmp_path / "stage", monitor=None)
    with ck:
        path = ck.save(m, epoch=3, step=7, optimizer=o, val_loss=0.25)
        meta = path.wait()
        assert Path(path).read_bytes()[:8] == SEALED_MAGIC
        ck.wait_all()  # the writer thread has made the next (empty) staging buffer
        assert not _staged_plaintext(tmp_path / "stage")  # the staged plaintext was unlinked after the write
        m2, o2 = _model(1)
        weight = m2[0].weight
        assert ck.load(path, m2, o2) == (3, 7)
        assert m2[0].weight is weight  # loaded in place
        assert _bytes(m2) == _bytes(m)
        assert all(torch.equal(a, b) for a, b in zip(o2.state_dict()["state"][0].values(),
                                                    o.state_dict()["state"][0].values()))
    assert verify_file(path, meta.checksum, keys=RING) == meta.checksum
    with CheckpointReader(path, keys=RING) as r:
        assert r.codec == codec and r.encryption == "aes-256-gcm" and r.key_id == "k1"
        assert r.tensor_bytes("0.weight") == _bytes(m)["0.weight"]


@pytest.mark.parametrize("codec", CODECS)
def test_format_layer_round_trip_and_no_plaintext(tmp_path: Path, codec: str) -> None:
    payload = _write(tmp_path / "f", codec)
    assert _load_all(tmp_path / "f") == payload
    raw = (tmp_path / "f").read_bytes()
    for needle in (PATTERN[:16], b"secret_layer", b"epoch"):
        assert needle not in raw
    grep = subprocess.run(["grep", "-a", "-F", "-c", PATTERN[:16].decode(), str(tmp_path / "f")],
                          capture_output=True, text=True)
    assert grep.returncode == 1 and grep.stdout.strip() == "0"
    if codec == "none":  # the same without encryption shows it all (the control: this test can fail)
        _write(tmp_path / "plain", codec, key=None)
        assert PATTERN in (tmp_path / "plain").read_bytes() and b"secret_layer" in (tmp_path / "plain").read_bytes()


def test_no_weight_pattern_in_a_saved_checkpoint(tmp_path: Path) -> None:
    m = torch.nn.Linear(8, 64, bias=False)
    with torch.no_grad():
        m.weight.view(-1).view(torch.uint8)[:] = torch.frombuffer(bytearray(PATTERN * 64), dtype=torch.uint8)
    for enc, found in (("aes-256-gcm", 0), ("none", 1)):
        with ModelCheckpointer(tmp_path / enc, compression="none", encryption=enc, keys=RING,
                               staging_dir=tmp_path / f"stage-{enc}", monitor=None) as ck:
            path = ck.save(m, epoch=0, step=1)
            path.wait()
            ck.wait_all()
            assert bool(_staged_plaintext(tmp_path / f"stage-{enc}")) == bool(found)  # control: unencrypted stays staged
        grep = subprocess.run(["grep", "-a", "-F", "-c", PATTERN.decode(), str(path)], capture_output=True, text=True)
        assert int(grep.stdout.strip()) >= found and (found or grep.returncode == 1), (enc, grep.stdout)


# --- keys --------------------------------------------------------------------------------------------


def test_wrong_and_missing_key_are_key_errors_naming_the_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLIGHTLOG_CHECKPOINT_KEY", raising=False)
    m, o = _model(0)
    with ModelCheckpointer(tmp_path / "ck", encryption="aes-256-gcm", keys=RING, staging_dir=tmp_path / "s") as ck:
        path = ck.save(m, epoch=0, step=1, optimizer=o)
        path.wait()
    m2, o2 = _model(1)
    before = _bytes(m2)
    wrong = KeyRing([Key("k1", K2.material)])
    for keys, match in ((wrong, "not the key this checkpoint was encrypted with"), (KeyRing([K2]), "'k1'")):
        with ModelCheckpointer(tmp_path / "ck", keys=keys, staging_dir=tmp_path / "s") as other:
            with pytest.raises(CheckpointKeyError, match=match) as info:
                other.load(path, m2, o2)
            assert "k1" in str(info.value)
        assert _bytes(m2) == before  # never garbage tensors
    with pytest.raises(CheckpointKeyError, match="no key is configured"):  # no keys at all (and no variable)
        CheckpointReader(path)
    with pytest.raises(CheckpointKeyError, match="needs a key"):
        ModelCheckpointer(tmp_path / "ck2", encryption="aes-256-gcm", staging_dir=tmp_path / "s")


def test_key_from_the_environment_and_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIGHTLOG_CHECKPOINT_KEY", _b64(K1))
    m, o = _model(0)
    with ModelCheckpointer(tmp_path / "ck", encryption="aes-256-gcm", staging_dir=tmp_path / "s") as ck:
        old = ck.save(m, epoch=0, step=1)
        old.wait()
    monkeypatch.setenv("FLIGHTLOG_CHECKPOINT_KEY", f"{_b64(K2)}, {_b64(K1)}")  # rotated: k2 seals, k1 still opens
    with ModelCheckpointer(tmp_path / "ck", encryption="aes-256-gcm", staging_dir=tmp_path / "s",
                           run_id=ck.run_id) as ck2:
        new = ck2.save(m, epoch=0, step=2)
        new.wait()
        m2, _ = _model(1)
        assert ck2.load(old, m2) == (0, 1) and _bytes(m2) == _bytes(m)
        assert ck2.load(new, m2) == (0, 2)
    ids = []
    for p in (old, new):
        with CheckpointReader(p) as r:
            ids.append(r.key_id)
    assert ids == ["k1", "k2"]
    monkeypatch.setenv("FLIGHTLOG_CHECKPOINT_KEY", _b64(K2))  # k1 retired too early
    with pytest.raises(CheckpointKeyError, match="key id 'k1'.*\\['k2'\\]"):
        CheckpointReader(old)


def test_key_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text(_b64(K1) + "\n# old key\n" + _b64(K2) + "\n")
    f.chmod(0o644)
    with pytest.raises(CheckpointKeyError, match="mode 0644.*chmod 600"):
        load_keyring(key_file=str(f))
    f.chmod(0o600)
    ring = load_keyring(key_file=str(f))
    assert ring is not None and ring.ids == ["k1", "k2"] and ring.primary.material == K1.material
    link = tmp_path / "link"
    link.symlink_to(f)
    with pytest.raises(CheckpointKeyError, match="symlink"):
        load_keyring(key_file=str(link))
    f.write_text("k1:" + base64.b64encode(b"short").decode())
    with pytest.raises(CheckpointKeyError, match="5 bytes") as info:
        load_keyring(key_file=str(f))
    assert "c2hvcnQ" not in str(info.value)  # errors never echo key material


def test_key_command(tmp_path: Path) -> None:
    ring = load_keyring(key_command=[sys.executable, "-c", f"print({_b64(K2)!r})"])
    assert ring is not None and ring.ids == ["k2"] and ring.primary.material == K2.material
    # A string is split into argv but never given to a shell: the ';' reaches the program as an argument.
    script = tmp_path / "k.py"
    script.write_text(f"import sys\nassert sys.argv[1:] == [';', 'touch', {str(tmp_path / 'x')!r}]\nprint({_b64(K1)!r})\n")
    ring = load_keyring(key_command=f"{sys.executable} {script} ';' touch {tmp_path / 'x'}")
    assert ring is not None and ring.ids == ["k1"] and not (tmp_path / "x").exists()
    with pytest.raises(CheckpointKeyError, match="exited with status 3: vault sealed"):
        load_keyring(key_command=[sys.executable, "-c", "import sys; sys.stderr.write('vault sealed'); sys.exit(3)"])
    with pytest.raises(CheckpointKeyError, match="did not finish within 0.5 s"):
        load_keyring(key_command=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    with pytest.raises(CheckpointKeyError, match="cannot run"):
        load_keyring(key_command=[str(tmp_path / "no-such-vault")])


def test_parse_keys_and_config() -> None:
    bare = base64.b64encode(K1.material).decode()
    (k,) = parse_keys(bare, "test")
    assert len(k.key_id) == 16 and k.material == K1.material and "redacted" in repr(k)
    for text, match in (("", "holds no key"), ("a b:c:!!", "not base64|invalid id"),
                        (f"{_b64(K1)}\nk1:{base64.b64encode(K2.material).decode()}", "two different keys")):
        with pytest.raises(CheckpointKeyError, match=match):
            parse_keys(text, "test")
    cfg = load_config({"checkpointing": {"encryption": "aes-256-gcm", "key_command": ["vault", "read"],
                                         "key_file": "~/.k"}}, env={})
    assert cfg.checkpointing.encryption == "aes-256-gcm" and cfg.checkpointing.key_command == ["vault", "read"]
    with pytest.raises(Exception, match="encryption"):
        load_config({"checkpointing": {"encryption": "rot13"}}, env={})
    spec = CheckpointSpec(path="/x", staging="/s", data_bytes=0, tensors=[], metadata={}, epoch=0, step=0,
                          encryption="aes-256-gcm", key_id="k1", key=base64.b64encode(K1.material).decode())
    assert "redacted" in repr(spec) and spec.key not in repr(spec) and spec.key not in str(spec)


def test_key_use_hook_hears_seal_open_and_refusal(tmp_path: Path) -> None:
    seen: list[KeyUse] = []
    remove = on_key_use(seen.append)
    try:
        _write(tmp_path / "f")
        _load_all(tmp_path / "f")
        with pytest.raises(CheckpointKeyError):
            _load_all(tmp_path / "f", KeyRing([Key("k1", K2.material)]))
    finally:
        remove()
    assert [(u.action, u.key_id, u.outcome) for u in seen] == [("seal", "k1", "ok"), ("open", "k1", "ok"),
                                                               ("open", "k1", "wrong key")]
    assert seen[1].path == str(tmp_path / "f")


# --- tampering ---------------------------------------------------------------------------------------


def test_a_flipped_bit_anywhere_in_the_header_or_trailer_is_corrupt(tmp_path: Path) -> None:
    _write(tmp_path / "f", "zstd")
    good = (tmp_path / "f").read_bytes()
    _, env_raw = decode_envelope(good, len(good), "f")
    bad = tmp_path / "bad"
    for pos in [*range(len(env_raw)), *range(len(good) - FOOTER.size, len(good))]:
        for bit in (0, 5):
            raw = bytearray(good)
            raw[pos] ^= 1 << bit
            bad.write_bytes(bytes(raw))
            with pytest.raises(CheckpointCorrupt):
                CheckpointReader(bad, keys=RING, verify=False)
    # The sealed index, and bytes inside frames, fail authentication even with the outer checks redone.
    frames = _frames(tmp_path / "f")
    for pos in (frames[0][0] + 3, frames[1][0] + OVERHEAD, frames[-1][0] + frames[-1][1] - 1, len(good) - FOOTER.size - 1):
        raw = bytearray(good)
        raw[pos] ^= 0x40
        bad.write_bytes(bytes(_fix_outer(raw)))
        with pytest.raises(CheckpointCorrupt, match="fails authentication"):
            _load_all(bad)


def _edit_envelope(good: bytes, field: str, value: str) -> bytes:
    env, raw = decode_envelope(good, len(good), "f")
    body = json.loads(raw[12:-4])
    body[field] = value
    new = json.dumps(body, separators=(",", ":")).encode()
    assert len(new) == len(raw) - 16, "keep the length so the frames stay where the index says"
    out = bytearray(good)
    out[12:12 + len(new)] = new
    return bytes(_fix_outer(_fix_envelope_crc(out)))


def test_authenticated_envelope_fields_with_the_crc_redone(tmp_path: Path) -> None:
    _write(tmp_path / "f")
    good = (tmp_path / "f").read_bytes()
    env, _ = decode_envelope(good, len(good), "f")
    bad = tmp_path / "bad"
    both = KeyRing([K1, Key("k9", K2.material)])
    cases = [("file_id", "0" * 32, CheckpointCorrupt, "fails authentication"),
             ("alg", "aes-256-ocb", CheckpointCorrupt, "does not know"),
             ("key_id", "k9", CheckpointKeyError, "'k9'"),  # another key's id: its key check fails
             ("key_id", "kX", CheckpointKeyError, "'kX'"),
             ("check", "0" * len(env.check), CheckpointKeyError, "not the key")]
    for field, value, exc, match in cases:
        bad.write_bytes(_edit_envelope(good, field, value))
        with pytest.raises(exc, match=match):
            _load_all(bad, both)


def test_frames_swapped_between_files_or_reordered_or_truncated(tmp_path: Path) -> None:
    _write(tmp_path / "a", payload=PATTERN * 2048)
    _write(tmp_path / "b", payload=PATTERN[::-1] * 2048)
    a, b = (tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()
    fa = _frames(tmp_path / "a")
    assert len(fa) == 5 and fa[1][1] == fa[2][1] and _frames(tmp_path / "b") == fa
    bad = tmp_path / "bad"
    (o1, n1), (o2, _) = fa[1][:2], fa[2][:2]
    swapped = bytearray(a)
    swapped[o1:o1 + n1] = b[o1:o1 + n1]  # frame 1 of another file, same key, same place
    reordered = bytearray(a)
    reordered[o1:o1 + n1], reordered[o2:o2 + n1] = a[o2:o2 + n1], a[o1:o1 + n1]
    index_b = bytearray(a)  # the other file's (sealed) index and footer
    start = fa[-1][0] + fa[-1][1]
    index_b[start:] = b[start:]
    for raw in (swapped, reordered, index_b):
        bad.write_bytes(bytes(_fix_outer(raw)))
        with pytest.raises(CheckpointCorrupt, match="fails authentication"):
            _load_all(bad)
    for cut in (1, FOOTER.size, FOOTER.size + 1, len(a) - fa[-1][0], len(a) - fa[2][0], len(a) - 30):
        bad.write_bytes(a[:-cut])
        with pytest.raises(CheckpointCorrupt):
            _load_all(bad)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.integers(0, 64), fix=st.booleans())
def test_fuzz_sealed_parser_raises_only_typed_errors(tmp_path: Path, edits: list[tuple[int, int]], cut: int,
                                                     fix: bool) -> None:
    global _GOOD
    if _GOOD is None:
        _write(tmp_path / "seed", "zstd-bytegroup", payload=np.arange(2048, dtype=np.float32).tobytes(), chunk=2048)
        _GOOD = (tmp_path / "seed").read_bytes()
    raw = bytearray(_GOOD[:len(_GOOD) - cut])
    for pos, x in edits:
        if raw:
            raw[pos % len(raw)] ^= x
    if fix and len(raw) > FOOTER.size + 64:
        try:
            raw = _fix_outer(raw)
        except (struct.error, ValueError, OverflowError):
            pass
    f = tmp_path / "fuzz"
    f.write_bytes(bytes(raw))
    if bytes(raw) == _GOOD:  # the edits were all in the footer, which _fix_outer rewrote
        assert _load_all(f) == np.arange(2048, dtype=np.float32).tobytes()
        return
    with pytest.raises(CheckpointError):  # every edit is caught: never garbage, never another exception
        _load_all(f)


_GOOD: bytes | None = None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_envelope_decoder(blob: bytes) -> None:
    for raw in (blob, SEALED_MAGIC + blob):
        try:
            decode_envelope(raw, len(raw), "fuzz")
        except CheckpointCorrupt:
            pass


# --- agent, DCP, CLI ---------------------------------------------------------------------------------


def test_agent_written_encrypted_checkpoint(agent: AgentProcess, base_config: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIGHTLOG_CHECKPOINT_KEY", _b64(K1))
    base_config["checkpointing"].update(encryption="aes-256-gcm", compression="zstd")
    m, o = _model(0)
    with ExperimentTracker("enc", base_config) as tracker:
        assert tracker._client is not None  # the agent writes it
        path = tracker.save_checkpoint(model=m, epoch=1, step=5, optimizer=o, val_loss=1.0)
        meta = path.wait()
        m2, o2 = _model(1)
        assert tracker.load_checkpoint(path, m2, o2) == (1, 5)
        assert _bytes(m2) == _bytes(m)
    assert Path(path).read_bytes()[:8] == SEALED_MAGIC
    monkeypatch.delenv("FLIGHTLOG_CHECKPOINT_KEY")
    assert verify_file(path, meta.checksum, deep=False) == meta.checksum  # outer checksum without the key
    with pytest.raises(CheckpointKeyError, match="'k1'"):
        verify_file(path, meta.checksum)
    # the audit log of the agent's data dir: the agent's seal, the trainer's open, and the refused open of
    # the deep verify just above (this process, which no longer has the key), each one entry
    from flightlog.proto.audit import AuditLog

    uses = [e for e in AuditLog(agent.paths.data_dir).entries() if e.action == "key.use" and e.object == str(path)]
    assert sorted((e.detail, e.outcome) for e in uses) == [("key k1: open", "no key"), ("key k1: open", "ok"),
                                                           ("key k1: seal", "ok")], uses
    secrets = [K1.material, base64.b64encode(K1.material), PATTERN]
    weight = _bytes(m)["0.weight"][:32]
    staging = agent.paths.ring_dir.parent / "ckpt"
    assert not _staged_plaintext(staging, f"ckpt-{os.getpid()}-*.buf")  # unlinked once the agent had written it
    for root in (agent.paths.data_dir, Path(base_config["checkpointing"]["checkpoint_dir"])):
        for p in root.rglob("*"):
            if p.is_file():
                blob = p.read_bytes()
                assert not any(s in blob for s in secrets) and weight not in blob, p


def test_dcp_save_and_load_encrypted(tmp_path: Path) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.api import CheckpointException

    from flightlog.checkpoint import StorageReader, StorageWriter

    m, o = _model(0)
    state = {"model": m.state_dict(), "optim": o.state_dict()}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, storage_writer=StorageWriter(tmp_path / "ck", keys=RING), no_dist=True)
        rank = tmp_path / "ck" / "rank00000.safetensors.zst"
        assert rank.read_bytes()[:8] == SEALED_MAGIC
        m2, o2 = _model(1)
        target = {"model": m2.state_dict(), "optim": o2.state_dict()}
        dcp.load(target, storage_reader=StorageReader(tmp_path / "ck", keys=RING), no_dist=True)
        assert {k: v.numpy().tobytes() for k, v in target["model"].items()} == \
               {k: v.numpy().tobytes() for k, v in m.state_dict().items()}
        with pytest.raises(CheckpointException) as info:
            dcp.load(target, storage_reader=StorageReader(tmp_path / "ck", keys=KeyRing([K2])), no_dist=True)
    (exc, _), = info.value.failures.values()
    assert isinstance(exc, CheckpointKeyError) and "'k1'" in str(exc)


def _cli(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="flightlog")
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = args.func(args)
    return code, buf.getvalue()


def test_ckpt_verify_outer_without_key_deep_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLIGHTLOG_CHECKPOINT_KEY", raising=False)
    f = tmp_path / "f"
    _write(f, "zstd")
    code, out = _cli(["ckpt", "verify", str(f)])
    assert code == 0 and "OK" in out and "outer checksum only" in out and "'k1'" in out
    code, out = _cli(["ckpt", "verify", "--deep", str(f)])
    assert code == 1 and "NO KEY" in out and "'k1'" in out
    monkeypatch.setenv("FLIGHTLOG_CHECKPOINT_KEY", _b64(K1))
    code, out = _cli(["ckpt", "verify", "--deep", str(f)])
    assert code == 0 and out.startswith("OK") and "outer checksum only" not in out
    code, out = _cli(["ckpt", "show", "--json", str(f)])
    assert code == 0 and json.loads(out)["encryption"] == "aes-256-gcm" and json.loads(out)["key_id"] == "k1"
    code, out = _cli(["ckpt", "export", str(f), "--to", str(tmp_path / "plain.safetensors")])
    assert code == 0 and "decrypted" in out
    from safetensors.numpy import load_file

    assert load_file(str(tmp_path / "plain.safetensors"))["secret_layer.w"].tobytes() == PATTERN * 2048
    # A frame edited with the outer checksum redone passes the outer check only; --deep catches it.
    fr = _frames(f)
    raw = bytearray(f.read_bytes())
    raw[fr[2][0] + OVERHEAD] ^= 1
    f.write_bytes(bytes(_fix_outer(raw)))
    code, out = _cli(["ckpt", "verify", "--deep", str(f)])
    assert code == 1 and "CORRUPT" in out and "fails authentication" in out
    raw[5] ^= 1  # the envelope's magic: caught without any key
    f.write_bytes(bytes(raw))
    monkeypatch.delenv("FLIGHTLOG_CHECKPOINT_KEY")
    code, out = _cli(["ckpt", "verify", str(f)])
    assert code == 1 and "CORRUPT" in out


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.lists(st.sampled_from([_b64(K1), _b64(K2), "k1:", ":", "#x\n", ",", " ", "=="]),
                                         max_size=6).map("".join))
def test_fuzz_key_text_parser(text: str) -> None:
    try:
        keys = parse_keys(text, "fuzz")
    except CheckpointKeyError as exc:
        assert K1.material.hex() not in str(exc)
        return
    assert keys and all(len(k.material) == 32 for k in keys)


def test_tracker_config_key_file_and_fallback_without_keys(base_config: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpointing.key_file through the tracker's config (no agent: the in-process writer); a load whose
    every candidate lacks its key says so (CheckpointKeyError), not "corrupt"."""
    monkeypatch.setenv("FLIGHTLOG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLIGHTLOG_AGENT_SOCKET", str(tmp_path / "no-agent.sock"))
    monkeypatch.delenv("FLIGHTLOG_CHECKPOINT_KEY", raising=False)
    key_file = tmp_path / "ckpt.key"
    key_file.write_text(_b64(K2) + "\n")
    key_file.chmod(0o600)
    base_config["checkpointing"].update(encryption="aes-256-gcm", key_file=str(key_file), compression="gzip")
    m, o = _model(0)
    with ExperimentTracker("keyfile", base_config) as tracker:
        assert tracker._client is None
        first = tracker.save_checkpoint(model=m, epoch=0, step=1, optimizer=o)
        first.wait()
        second = tracker.save_checkpoint(model=m, epoch=0, step=2, optimizer=o)
        second.wait()
        with CheckpointReader(second, keys=KeyRing([K2])) as r:
            assert r.key_id == "k2" and r.codec == "gzip"
        m2, o2 = _model(1)
        assert tracker.load_checkpoint("latest", m2, o2) == (0, 2) and _bytes(m2) == _bytes(m)
    with ModelCheckpointer(Path(base_config["checkpointing"]["checkpoint_dir"]), keys=KeyRing([K1]),
                           registry=tmp_path / "data" / "flightlog.db", run_id=tracker.run_id,
                           staging_dir=tmp_path / "s") as other:
        with pytest.raises(CheckpointKeyError, match="no valid checkpoint.*'k2'"):
            other.load("latest", m2, o2, fallback=True)
