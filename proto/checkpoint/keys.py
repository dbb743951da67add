"""Checkpoint encryption keys: parsing, the key providers (an environment variable, a 0600 key file, a
command that prints them), a key ring with rotation (new saves use the first key, loads find theirs by id),
and a hook that tells listeners (the audit log) whenever a key is used."""
from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import shlex
import stat
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from flightlog.proto.errors import CheckpointKeyError

__all__ = [
    "DEFAULT_KEY_ENV",
    "KEY_BYTES",
    "KEY_ID",
    "Key",
    "KeyRing",
    "KeyUse",
    "parse_keys",
    "key_id_of",
    "load_keyring",
    "default_keyring",
    "on_key_use",
    "notify_key_use",
    "reset_key_use_hooks",
]

DEFAULT_KEY_ENV = "FLIGHTLOG_CHECKPOINT_KEY"
KEY_BYTES = 32  # AES-256
_MAX_KEY_TEXT = 64 << 10
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SPLIT = re.compile(r"[\s,]+")

log = logging.getLogger("flightlog.checkpoint.keys")


@dataclass(frozen=True, repr=False)
class Key:
    """One AES-256 key and its id (written into every file it seals; the key itself never is)."""

    key_id: str
    material: bytes

    def __repr__(self) -> str:
        return f"Key({self.key_id!r}, <{len(self.material)} bytes, redacted>)"


@dataclass(frozen=True)
class KeyUse:
    """A key was used (``action``: ``seal`` or ``open``) or asked for in vain (``outcome`` says why)."""

    action: str
    key_id: str
    path: str
    outcome: str = "ok"


_hooks: list[Callable[[KeyUse], None]] = []
_hooks_lock = threading.Lock()


def on_key_use(hook: Callable[[KeyUse], None]) -> Callable[[], None]:
    """Call ``hook`` on every key use in this process (e.g. to append an audit entry); returns a function
    that removes it. Hooks run on the thread that used the key and must be quick; one that raises is logged
    and skipped, never a reason to fail a save or a load."""
    with _hooks_lock:
        _hooks.append(hook)

    def remove() -> None:
        with _hooks_lock:
            if hook in _hooks:
                _hooks.remove(hook)

    return remove


def notify_key_use(use: KeyUse) -> None:
    log.debug("checkpoint key %s: %s %s (%s)", use.key_id, use.action, use.path, use.outcome)
    with _hooks_lock:
        hooks = list(_hooks)
    for hook in hooks:
        try:
            hook(use)
        except Exception:  # an audit hook's bug must not fail the checkpoint; it is logged loudly
            log.exception("checkpoint key-use hook %r failed", hook)


def reset_key_use_hooks() -> None:
    """Remove every hook (tests)."""
    with _hooks_lock:
        _hooks.clear()


def key_id_of(material: bytes) -> str:
    """The id of a key given without one: a fingerprint (SHA-256 of a domain tag and the key, 16 hex
    digits), the same wherever the key is configured."""
    return hashlib.sha256(b"flightlog checkpoint key id\x00" + material).hexdigest()[:16]


def parse_keys(text: str, source: str) -> list[Key]:
    """Keys from provider output: entries separated by newlines, commas or spaces, each ``ID:BASE64`` or a
    bare ``BASE64`` (its id is then :func:`key_id_of`); ``#`` starts a comment line. The first is the one
    new saves use. Errors name the source and the entry's number, never its value."""
    if len(text) > _MAX_KEY_TEXT:
        raise CheckpointKeyError(f"{source}: {len(text)} characters of key material (at most {_MAX_KEY_TEXT})")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    entries = [e for e in _SPLIT.split("\n".join(lines)) if e]
    keys: list[Key] = []
    for n, entry in enumerate(entries, 1):
        key_id, sep, encoded = entry.rpartition(":")
        if sep and not KEY_ID.fullmatch(key_id):
            raise CheckpointKeyError(f"{source}: key #{n} has an invalid id (1-64 of A-Z a-z 0-9 . _ -)")
        try:
            material = (base64.urlsafe_b64decode(encoded) if "-" in encoded or "_" in encoded
                        else base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise CheckpointKeyError(f"{source}: key #{n} is not base64 ({exc}); generate one with "
                                     "`python -c 'import os,base64; print(base64.b64encode(os.urandom(32)).decode())'`"
                                     ) from exc
        if len(material) != KEY_BYTES:
            raise CheckpointKeyError(f"{source}: key #{n} decodes to {len(material)} bytes; AES-256 needs {KEY_BYTES}")
        keys.append(Key(key_id if sep else key_id_of(material), material))
    if not keys:
        raise CheckpointKeyError(f"{source}: holds no key")
    seen: dict[str, bytes] = {}
    for k in keys:
        if seen.setdefault(k.key_id, k.material) != k.material:
            raise CheckpointKeyError(f"{source}: two different keys have the id {k.key_id!r}")
    return keys


class KeyRing:
    """Keys by id: ``primary`` (the first) seals new files; ``get`` finds the one a file names."""

    def __init__(self, keys: Sequence[Key], source: str = "") -> None:
        if not keys:
            raise CheckpointKeyError(f"{source or 'key ring'}: holds no key")
        self.keys = list(keys)
        self.source = source
        self._by_id = {k.key_id: k for k in reversed(self.keys)}

    @property
    def primary(self) -> Key:
        return self.keys[0]

    def get(self, key_id: str) -> Key | None:
        return self._by_id.get(key_id)

    @property
    def ids(self) -> list[str]:
        return [k.key_id for k in self.keys]

    def __repr__(self) -> str:
        return f"KeyRing({self.ids!r}, source={self.source!r})"


def _read_key_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointKeyError(f"checkpointing.key_file {path}: cannot open it: {exc.strerror or exc} "
                                 "(a symlink is refused too: name the file itself)") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointKeyError(f"checkpointing.key_file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise CheckpointKeyError(
                f"checkpointing.key_file {path} is mode {stat.S_IMODE(st.st_mode):04o}: a key file must be "
                f"readable by its owner only; run `chmod 600 {path}` (and consider rotating the key)")
        raw = os.read(fd, _MAX_KEY_TEXT + 1)
    finally:
        os.close(fd)
    return raw.decode("utf-8", "replace")


def _run_key_command(command: str | Sequence[str], timeout: float) -> str:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise CheckpointKeyError("checkpointing.key_command is empty")
    what = f"checkpointing.key_command {argv[0]!r}"
    try:  # no shell: the configured argv runs as is
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CheckpointKeyError(f"{what} did not finish within {timeout:g} s "
                                 "(raise checkpointing.key_command_timeout_seconds?)") from exc
    except OSError as exc:
        raise CheckpointKeyError(f"{what} cannot run: {exc.strerror or exc}") from exc
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip()[-300:]
        raise CheckpointKeyError(f"{what} exited with status {done.returncode}: {err or '(no stderr)'}")
    return done.stdout.decode("utf-8", "replace")


def load_keyring(*, key_env: str = DEFAULT_KEY_ENV, key_file: str | None = None,
                 key_command: str | Sequence[str] | None = None, timeout: float = 30.0,
                 environ: Mapping[str, str] | None = None) -> KeyRing | None:
    """The keys of the one configured provider: ``key_command`` if set, else ``key_file`` if set, else the
    environment variable ``key_env`` (None when it is unset: no key here)."""
    if key_command:
        return KeyRing(parse_keys(_run_key_command(key_command, timeout), "checkpointing.key_command"),
                       "key_command")
    if key_file:
        path = os.path.expanduser(key_file)
        return KeyRing(parse_keys(_read_key_file(path), f"checkpointing.key_file {path}"), f"key_file {path}")
    value = (os.environ if environ is None else environ).get(key_env) if key_env else None
    if value is None:
        return None
    return KeyRing(parse_keys(value, f"environment variable {key_env}"), f"${key_env}")


def default_keyring() -> KeyRing | None:
    """What a reader uses when it was handed no keys: ``$FLIGHTLOG_CHECKPOINT_KEY``, if set."""
    return load_keyring()
