"""The audit log: every data access and destructive action as one JSON line in ``<data dir>/audit.log``, each
entry carrying the SHA-256 of the one before (a hash chain) and the head sealed with an HMAC under a local 0600
key (``audit.seal``), so an edit, a deletion, a reordering or a truncation is named by ``verify_log``.

Shared core (not agent-only): the agent, the CLI and the SDK's in-process checkpoint code all append to it.
The chain check is sans-IO (``verify_lines``); ``AuditLog`` is the thin file shell around it."""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import pwd
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from flightlog.proto.errors import AuditCorrupt, AuditError, FlightlogError
from flightlog.proto.osutil import PRIVATE_FILE_MODE, make_dirs

__all__ = ["AUDIT_LOG", "AUDIT_KEY", "AUDIT_SEAL", "GENESIS", "MAX_ENTRY_BYTES", "MISMATCH", "AuditEntry", "Seal",
           "Verdict", "AuditLog", "entry_hash", "parse_entry", "seal_mac", "verify_lines", "record", "key_use"]

log = logging.getLogger("flightlog")

AUDIT_LOG, AUDIT_KEY, AUDIT_SEAL = "audit.log", "audit.key", "audit.seal"
#: The ``prev`` of the first entry.
GENESIS = "0" * 64
#: An entry is a short line; anything longer is refused before it is parsed (outside bytes).
MAX_ENTRY_BYTES = 64 << 10
#: The action of the entry an append writes first when the log no longer matches its seal: the evidence stays
#: in the chain even if whoever cut the log also let flightlog go on appending after it.
MISMATCH = "audit.mismatch"
_KEY_BYTES = 32
_SEAL_BYTES = 256  # a seal is ~180 bytes of JSON; padded with spaces to one fixed size
_SEAL_CONTEXT = b"flightlog-audit-seal-v1"


class AuditEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One entry; ``prev`` is the SHA-256 (hex) of the previous entry's line, ``GENESIS`` for the first."""

    seq: int
    time: float
    uid: int
    user: str
    pid: int
    host: str
    action: str
    object: str
    outcome: str
    prev: str
    run: str = ""
    detail: str = ""


class Seal(msgspec.Struct, forbid_unknown_fields=True):
    """How many entries the log held and the hash of its last line, authenticated with the local key."""

    count: int
    head: str
    mac: str


_entry_decoder = msgspec.json.Decoder(AuditEntry)
_seal_decoder = msgspec.json.Decoder(Seal)
_encoder = msgspec.json.Encoder()


def entry_hash(line: bytes) -> str:
    """SHA-256 (hex) of an entry's line as stored, without its newline."""
    return hashlib.sha256(line).hexdigest()


def seal_mac(key: bytes, count: int, head: str) -> str:
    return hmac.digest(key, b"%s:%d:%s" % (_SEAL_CONTEXT, count, head.encode()), "sha256").hex()


def parse_entry(line: bytes) -> AuditEntry:
    """An entry from its line; AuditCorrupt (and nothing else) for anything that is not one."""
    if len(line) > MAX_ENTRY_BYTES:
        raise AuditCorrupt(f"{len(line)} bytes, over the {MAX_ENTRY_BYTES}-byte limit of an entry")
    try:
        entry = _entry_decoder.decode(line)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise AuditCorrupt(f"not an audit entry ({exc})") from exc
    if len(entry.prev) != 64:
        raise AuditCorrupt(f"prev is not a SHA-256 hex digest: {entry.prev[:80]!r}")
    return entry


@dataclass(frozen=True)
class Verdict:
    """What ``verify_lines`` found: ``ok``, the number of entries read, and the first bad entry (its index,
    None where the problem is the seal itself) with the reason."""

    ok: bool
    entries: int
    bad_entry: int | None = None
    problem: str = ""


def _where(i: int) -> str:
    return f"entry {i} (line {i + 1})"


def verify_lines(lines: Iterable[bytes], seal: Seal | None, key: bytes | None) -> Verdict:
    """Check the chain of ``lines`` (without newlines) and the seal of its head; sans-IO."""
    prev, n = GENESIS, 0
    for i, line in enumerate(lines):
        n = i + 1
        try:
            e = parse_entry(line)
        except AuditCorrupt as exc:
            return Verdict(False, n, i, f"{_where(i)}: {exc}")
        if e.seq != i:
            why = (f"entries {i}..{e.seq - 1} were deleted, or the log reordered" if e.seq > i
                   else "the log was reordered, or an entry duplicated")
            return Verdict(False, n, i, f"{_where(i)} has seq {e.seq} where {i} belongs: {why}")
        if e.prev != prev:
            if i == 0:
                return Verdict(False, n, 0, f"{_where(0)} does not start the chain (prev is not the genesis hash)")
            return Verdict(False, n, i - 1, f"{_where(i - 1)} was changed: {_where(i)} recorded another hash of it")
        if e.action == MISMATCH:
            return Verdict(False, n, i, f"{_where(i)} records that the log did not match its seal when it was "
                                        f"appended (cut or edited before then): {e.detail}")
        prev = entry_hash(line)
    if seal is None:
        if n == 0:
            return Verdict(True, 0)
        return Verdict(False, n, None, f"no seal ({AUDIT_SEAL} is missing or unreadable) for a log of {n} entries")
    if key is None:
        return Verdict(False, n, None, f"the seal key ({AUDIT_KEY}) is missing: the seal cannot be checked")
    if not hmac.compare_digest(seal.mac, seal_mac(key, seal.count, seal.head)):
        return Verdict(False, n, None, f"the seal is not authentic (HMAC mismatch): {AUDIT_SEAL} was changed")
    if seal.count > n:
        return Verdict(False, n, n, f"the log was truncated: the seal covers {seal.count} entries, the log holds "
                                    f"{n}; entries {n}..{seal.count - 1} are gone")
    if seal.count < n:
        return Verdict(False, n, seal.count, f"{_where(seal.count)} and after were appended behind flightlog's "
                                             f"back: the seal covers {seal.count} entries")
    if seal.head != prev:
        return Verdict(False, n, n - 1, f"{_where(n - 1)} was changed: it does not match the seal's head")
    return Verdict(True, n)


def _split_lines(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


@dataclass(frozen=True)
class _Who:
    uid: int
    user: str
    pid: int


@functools.lru_cache(maxsize=64)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class AuditLog:
    """The audit log of one data directory. Appends take an exclusive ``flock`` on the log, so the agent, CLI
    commands and trainers may append at once; each append rewrites the seal (atomically, by rename)."""

    def __init__(self, data_dir: str | os.PathLike[str], *, durable: bool = False) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / AUDIT_LOG
        self.key_path = self.dir / AUDIT_KEY
        self.seal_path = self.dir / AUDIT_SEAL
        self.durable = durable  # fsync the log and the seal on each append (a power loss loses nothing)
        self._host = socket.gethostname()
        self._key: bytes | None = None
        self._dir_made = False

    # --- appending -------------------------------------------------------------------------------

    def append(self, action: str, obj: str, outcome: str = "ok", *, run: str = "", detail: str = "",
               uid: int | None = None, pid: int | None = None) -> AuditEntry:
        """Append one entry (``uid``/``pid``: the peer the action was done for; default this process)."""
        uid = os.getuid() if uid is None else uid
        who = _Who(uid, _user_name(uid), os.getpid() if pid is None else pid)
        if not self._dir_made:
            make_dirs(self.dir)
            self._dir_made = True
        fd = _open_private(self.path, os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            key = self._load_key(create=True)
            assert key is not None
            count, head, tail_ok = _tail(fd)
            problem = self._seal_problem(count, head, key, tail_ok)
            if problem:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    os.write(fd, b"\n")  # a cut mid-line: the evidence goes on a line of its own
                    count, head, _ = _tail(fd)
                self._write(fd, AuditEntry(count, time.time(), who.uid, who.user, who.pid, self._host, MISMATCH,
                                           AUDIT_LOG, "error", head, detail=problem))
                count, head, _ = _tail(fd)
            entry = AuditEntry(count, time.time(), who.uid, who.user, who.pid, self._host, action, obj, outcome,
                               head, run=run, detail=detail)
            line = self._write(fd, entry)
            self._write_seal(Seal(count + 1, entry_hash(line), seal_mac(key, count + 1, entry_hash(line))))
            return entry
        finally:
            os.close(fd)  # releases the lock

    def _write(self, fd: int, entry: AuditEntry) -> bytes:
        line = _encoder.encode(entry)
        os.write(fd, line + b"\n")  # O_APPEND: one write, one line
        if self.durable:
            os.fsync(fd)
        return line

    def _seal_problem(self, count: int, head: str, key: bytes, tail_ok: bool) -> str:
        if not tail_ok:
            return "the log's last line is not a whole entry"
        seal = self.read_seal()
        if seal is None:
            return "" if count == 0 else f"no seal for a log of {count} entries"
        if not hmac.compare_digest(seal.mac, seal_mac(key, seal.count, seal.head)):
            return "the seal is not authentic"
        if (seal.count, seal.head) != (count, head):
            return f"the seal covered {seal.count} entries ending in {seal.head[:16]}, the log held {count}"
        return ""

    def _write_seal(self, seal: Seal) -> None:
        # Rewritten in place, one fixed-size pwrite: a rename per append costs milliseconds on ext4 (it
        # flushes the new file's data), and the seal is written under the log's lock anyway.
        fd = _open_private(self.seal_path, os.O_WRONLY)
        try:
            os.pwrite(fd, _encoder.encode(seal).ljust(_SEAL_BYTES), 0)
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _load_key(self, *, create: bool) -> bytes | None:
        if self._key is not None:
            return self._key
        try:
            fd = os.open(self.key_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                return None
            try:
                fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             PRIVATE_FILE_MODE)
            except FileExistsError:
                return self._load_key(create=False)  # another process made it meanwhile
            key = secrets.token_bytes(_KEY_BYTES)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._key = key
            return key
        except OSError as exc:
            raise AuditError(f"cannot open the audit key {self.key_path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise AuditError(f"the audit key {self.key_path} is readable by others (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {self.key_path}`")
            key = os.read(fd, _KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != _KEY_BYTES:
            raise AuditError(f"the audit key {self.key_path} is {len(key)} bytes, not {_KEY_BYTES}")
        self._key = key
        return key

    # --- reading ---------------------------------------------------------------------------------

    def read_seal(self) -> Seal | None:
        try:
            data = _read_bounded(self.seal_path, 4096)
        except FileNotFoundError:
            return None
        try:
            return _seal_decoder.decode(data)
        except msgspec.DecodeError:
            return None

    def lines(self) -> Iterator[bytes]:
        """The log's lines (no newlines), each read with a bound; none when there is no log."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as f:
            while line := f.readline(MAX_ENTRY_BYTES + 2):
                yield line[:-1] if line.endswith(b"\n") else line

    def entries(self) -> Iterator[AuditEntry]:
        for i, line in enumerate(self.lines()):
            try:
                yield parse_entry(line)
            except AuditCorrupt as exc:
                raise AuditCorrupt(f"{self.path}: {_where(i)}: {exc}; run `flightlog audit verify`") from exc

    def verify(self) -> Verdict:
        """The chain and the seal, read under a shared lock (no append lands between the two)."""
        try:
            key = self._load_key(create=False)
        except AuditError as exc:
            return Verdict(False, 0, None, str(exc))
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return verify_lines([], self.read_seal(), key)
        except OSError as exc:
            return Verdict(False, 0, None, f"cannot open {self.path}: {exc.strerror}")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return verify_lines(self.lines(), self.read_seal(), key)
        finally:
            os.close(fd)


def _open_private(path: Path, flags: int) -> int:
    """Open (creating 0600) a file of ours without following a symlink; refuse one that is not regular."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as exc:
        what = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
        raise AuditError(f"{path} {what}: flightlog will not write its audit log there; remove it") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AuditError(f"{path} is not a regular file; remove it")
    return fd


def _read_bounded(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _tail(fd: int) -> tuple[int, str, bool]:
    """(entries so far, hash of the last line, whether the last line is a whole entry) from the log's end."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS, True
    for window in (4096, MAX_ENTRY_BYTES + 2):  # an entry is ~250 bytes: the small read nearly always does
        n = min(size, window)
        data = os.pread(fd, n, size - n)
        body = data[:-1] if data.endswith(b"\n") else data
        cut = body.rfind(b"\n")
        if cut >= 0 or n == size:
            break
    last = body[cut + 1:]
    try:
        entry = parse_entry(last)
    except AuditCorrupt:
        # Chain to the bytes that are there; the mismatch entry says why.
        return sum(1 for _ in _split_lines(os.pread(fd, size, 0))), entry_hash(last), False
    return entry.seq + 1, entry_hash(last), data.endswith(b"\n")


# --- the hook anyone can call ----------------------------------------------------------------------


def record(action: str, obj: str, outcome: str = "ok", *, data_dir: str | os.PathLike[str] | None = None,
           run: str = "", detail: str = "", uid: int | None = None, pid: int | None = None) -> None:
    """Append one entry to the audit log of ``data_dir`` (default: this user's resolved data directory).

    For call sites that must not fail because of the audit log (a checkpoint load, a retention pass): an
    error is logged as a warning, never raised."""
    try:
        if data_dir is None:
            from flightlog.proto.paths import resolve_paths

            data_dir = resolve_paths().data_dir
        AuditLog(data_dir).append(action, obj, outcome, run=run, detail=detail, uid=uid, pid=pid)
    except (FlightlogError, OSError) as exc:
        log.warning("flightlog: could not append %s %s to the audit log: %s", action, obj, exc)


def key_use(key_id: str, purpose: str, obj: str, outcome: str = "ok", *,
            data_dir: str | os.PathLike[str] | None = None, run: str = "") -> None:
    """The "key use" hook for checkpoint encryption: ``purpose`` is e.g. "encrypt" or "decrypt"."""
    record("key.use", obj, outcome, data_dir=data_dir, run=run, detail=f"key {key_id}: {purpose}")


_key_use_dirs: dict[str, Callable[[], None]] = {}  # data dir -> the remover of its hook (one hook per audit log)
_key_use_lock = threading.Lock()


def audit_key_uses(data_dir: str | os.PathLike[str]) -> None:
    """Append a ``key.use`` entry to ``data_dir``'s audit log for every use (or refusal) of a checkpoint key in
    this process (``flightlog.proto.checkpoint.keys.on_key_use``); once per data dir, however often called."""
    from flightlog.proto.checkpoint.keys import KeyUse, on_key_use

    where = os.fspath(data_dir)
    with _key_use_lock:
        if where in _key_use_dirs:
            return

        def hook(use: KeyUse) -> None:
            key_use(use.key_id, use.action, use.path, use.outcome, data_dir=where)

        _key_use_dirs[where] = on_key_use(hook)
