"""Sealed checkpoint frames, sans-IO: the envelope that opens an encrypted file, and AES-256-GCM sealing
of each frame (``cryptography``'s AESGCM; nothing here is a cipher or hash of its own).

Envelope: ``magic "FLCKSEAL" | u32 json_len | JSON {v, alg, key_id, file_id, check} | u32 crc32`` (the CRC
catches damage without the key). ``check`` is a GCM tag over nothing, bound to the key id: it tells a
wrong key (CheckpointKeyError) from a damaged file (CheckpointCorrupt). A sealed frame is ``nonce (12,
random) | ciphertext | tag (16)``; its associated data is the whole envelope (so the algorithm, key id and
file id are authenticated, and a frame of another file fails) plus the frame's kind and number (so frames
cannot be reordered); the index is sealed the same way under its own kind.
"""
from __future__ import annotations

import base64
import os
import struct
import zlib
from typing import TYPE_CHECKING, Any

import msgspec

from flightlog.proto.errors import CheckpointCorrupt, CheckpointError, CheckpointKeyError

from .keys import KEY_BYTES, KEY_ID, Key, KeyRing, KeyUse, notify_key_use

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALGORITHM",
    "ENCRYPTIONS",
    "NONCE_BYTES",
    "OVERHEAD",
    "SEALED_MAGIC",
    "Envelope",
    "Opener",
    "Sealer",
    "decode_envelope",
    "key_from_spec",
    "open_file_key",
]

ALGORITHM = "aes-256-gcm"
ENCRYPTIONS = ("none", ALGORITHM)
SEALED_MAGIC = b"FLCKSEAL"
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
_PIECE = 1 << 20  # bytes per decryption call of a large frame (see Opener._open_in_pieces)
ENVELOPE_VERSION = 1
_HEAD = struct.Struct("<8sI")
_MAX_ENVELOPE = 4096
_CHECK_AAD = b"flightlog checkpoint key check\x00"


class Envelope(msgspec.Struct):  # a newer writer's extra fields are authenticated too, and its v says so
    v: int
    alg: str
    key_id: str
    file_id: str  # 32 hex digits, random per file
    check: str  # hex: nonce | tag of the key check


def _aead(material: bytes) -> AESGCM:
    """AESGCM for ``material``; ``cryptography`` (the ``security`` extra) is imported only here, by those
    who encrypt. From cryptography 50 on it releases the GIL, so frames are sealed on every core."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:
        raise CheckpointError("encrypted checkpoints need the cryptography package: "
                              "pip install 'flightlog[security]'") from exc
    return AESGCM(material)


def _check_value(aead: AESGCM, nonce: bytes, key_id: str) -> bytes:
    return nonce + aead.encrypt(nonce, b"", _CHECK_AAD + key_id.encode())


def _frame_aad(envelope: bytes, kind: bytes, i: int) -> bytes:
    return envelope + kind + struct.pack("<Q", i)


class Sealer:
    """Seals the frames of one new file (a fresh file id and envelope per file: never reuse one)."""

    def __init__(self, key: Key) -> None:
        if len(key.material) != KEY_BYTES:
            raise CheckpointKeyError(f"checkpoint key {key.key_id!r} is {len(key.material)} bytes, not {KEY_BYTES}")
        self.key_id = key.key_id
        self._aead = _aead(key.material)
        check = _check_value(self._aead, os.urandom(NONCE_BYTES), key.key_id)
        body = msgspec.json.encode(Envelope(ENVELOPE_VERSION, ALGORITHM, key.key_id, os.urandom(16).hex(),
                                            check.hex()))
        head = _HEAD.pack(SEALED_MAGIC, len(body)) + body
        self.envelope = head + struct.pack("<I", zlib.crc32(head))

    def seal(self, i: int, data: bytes | memoryview) -> bytearray:
        """Frame ``i`` sealed: ``nonce | ciphertext | tag``, written straight into one buffer."""
        out = bytearray(NONCE_BYTES + len(data) + TAG_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        out[:NONCE_BYTES] = nonce
        with memoryview(out) as view:
            self._aead.encrypt_into(nonce, data, _frame_aad(self.envelope, b"F", i), view[NONCE_BYTES:])
        return out

    def seal_index(self, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, _frame_aad(self.envelope, b"I", 0))


def decode_envelope(buf: Any, size: int, name: str) -> tuple[Envelope, bytes]:
    """The envelope at the start of ``buf`` (``size`` bytes long) and its raw bytes; any damage, or an
    algorithm or version this flightlog does not know, is CheckpointCorrupt."""
    if size < _HEAD.size + 4:
        raise CheckpointCorrupt(f"{name}: truncated in its encryption envelope")
    magic, n = _HEAD.unpack(bytes(buf[:_HEAD.size]))
    if magic != SEALED_MAGIC or n > _MAX_ENVELOPE or _HEAD.size + n + 4 > size:
        raise CheckpointCorrupt(f"{name}: the encryption envelope is damaged (length {n})")
    raw = bytes(buf[:_HEAD.size + n + 4])
    if zlib.crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
        raise CheckpointCorrupt(f"{name}: the encryption envelope fails its CRC (damaged)")
    try:
        env = msgspec.json.decode(raw[_HEAD.size:-4], type=Envelope)
        check = bytes.fromhex(env.check)
        bytes.fromhex(env.file_id)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise CheckpointCorrupt(f"{name}: the encryption envelope is malformed: {exc}") from exc
    if env.v != ENVELOPE_VERSION:
        raise CheckpointCorrupt(f"{name}: encryption envelope version {env.v}; this flightlog reads "
                                f"{ENVELOPE_VERSION} (upgrade flightlog to read newer files)")
    if env.alg != ALGORITHM:
        raise CheckpointCorrupt(f"{name}: encrypted with {env.alg!r}, which this flightlog does not know")
    if len(check) != OVERHEAD or len(env.file_id) != 32 or not KEY_ID.fullmatch(env.key_id):
        raise CheckpointCorrupt(f"{name}: the encryption envelope is malformed (key id, key check or file id)")
    return env, raw


class Opener:
    """Opens the sealed frames of one file with its key, once the key check passed."""

    def __init__(self, env: Envelope, raw: bytes, key: Key, name: str) -> None:
        self.name = name
        self.key_id = env.key_id
        self.envelope = raw
        self._aead = _aead(key.material)
        self._material = key.material
        check = bytes.fromhex(env.check)
        if _check_value(self._aead, check[:NONCE_BYTES], env.key_id) != check:
            raise CheckpointKeyError(f"{name}: the key configured under id {env.key_id!r} is not the key this "
                                     "checkpoint was encrypted with; configure the right key for that id")

    def _open(self, kind: bytes, i: int, sealed: memoryview | bytes, out: memoryview | None, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag  # importable: _aead made this opener

        if len(sealed) < OVERHEAD:
            raise CheckpointCorrupt(f"{self.name}: {what} is shorter than its nonce and tag")
        nonce, body = bytes(sealed[:NONCE_BYTES]), sealed[NONCE_BYTES:]
        aad = _frame_aad(self.envelope, kind, i)
        try:
            if out is None:
                return self._aead.decrypt(nonce, body, aad)
            if len(body) <= _PIECE + TAG_BYTES:
                self._aead.decrypt_into(nonce, body, aad, out)
            else:
                self._open_in_pieces(nonce, body, aad, out)
            return b""
        except InvalidTag as exc:
            raise CheckpointCorrupt(f"{self.name}: {what} fails authentication: the file was modified, damaged, "
                                    "or its frames were moved or taken from another file") from exc

    def _open_in_pieces(self, nonce: bytes, body: memoryview | bytes, aad: bytes, out: memoryview) -> None:
        """The same GCM decryption through ``cryptography``'s streaming interface, ``_PIECE`` bytes a call:
        it holds the GIL while it works, so one call per 8 MiB frame would keep the other decoder threads
        (their zstd runs outside the GIL) waiting up to 2 ms for each return; the tag is checked at the end."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        data, tag = memoryview(body)[:-TAG_BYTES], bytes(memoryview(body)[-TAG_BYTES:])
        dec = Cipher(algorithms.AES(self._material), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(aad)
        n, off = len(data), 0
        while off + _PIECE + 15 <= n:  # update_into wants room for a block more than it is given
            dec.update_into(data[off:off + _PIECE], out[off:off + _PIECE + 15])
            off += _PIECE
        out[off:n] = dec.update(data[off:n])
        dec.finalize()

    def open(self, i: int, sealed: memoryview | bytes, where: int) -> bytes:
        return self._open(b"F", i, sealed, None, f"frame {i} at byte {where}")

    def open_into(self, i: int, sealed: memoryview | bytes, where: int, out: memoryview) -> None:
        """Decrypt frame ``i`` into ``out`` (exactly its plaintext size). On failure ``out`` holds
        unauthenticated bytes: hand only memory that is thrown away on error."""
        self._open(b"F", i, sealed, out, f"frame {i} at byte {where}")

    def open_index(self, sealed: memoryview | bytes) -> bytes:
        return self._open(b"I", 0, sealed, None, "the frame index")


def open_file_key(env: Envelope, keys: KeyRing | None, name: str) -> Key:
    """The key ``env`` names, from ``keys``; CheckpointKeyError naming the id (and where keys come from)."""
    key = keys.get(env.key_id) if keys is not None else None
    if key is None:
        have = f"the configured keys ({keys.source}) are {keys.ids}" if keys is not None else "no key is configured"
        notify_key_use(KeyUse("open", env.key_id, name, "no key"))
        raise CheckpointKeyError(
            f"{name}: encrypted with key id {env.key_id!r}, and {have}; set FLIGHTLOG_CHECKPOINT_KEY or "
            "checkpointing.key_file / key_command to a key ring that holds it (old keys stay listed after a rotation)")
    return key


def key_from_spec(spec: dict[str, Any]) -> Key | None:
    """The key a CheckpointSpec (as builtins) asks the writer to seal with, or None for no encryption."""
    enc = spec.get("encryption") or "none"
    if enc == "none":
        return None
    if enc != ALGORITHM:
        raise CheckpointError(f"unknown checkpoint encryption {enc!r}; use one of {', '.join(ENCRYPTIONS)}")
    try:
        material = base64.b64decode(str(spec.get("key") or ""), validate=True)
    except ValueError:  # binascii.Error is one
        material = b""
    key_id = str(spec.get("key_id") or "")
    if len(material) != KEY_BYTES or not key_id:
        raise CheckpointKeyError(f"checkpoint {spec.get('path')}: encryption {ALGORITHM} was asked for without a "
                                 f"valid key (key id {key_id!r}); check checkpointing.key_* settings")
    return Key(key_id, material)
