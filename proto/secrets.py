"""Credentials by name: a store (the OS keyring where a real backend exists, else a 0600 JSON file under the
user's config dir) filled by ``flightlog secrets set NAME`` from stdin, and the ``${secret:NAME}`` and
``${env:NAME}`` references config values may hold.

Credential keys (``CREDENTIAL_KEYS``) hold only references: the reference travels (config, WAL, the run's
params) and the value is looked up where it is used (a sink, in the agent), so it is never written anywhere.
Other keys may use ``${env:NAME}``, replaced when the config is loaded; ``${secret:NAME}`` is refused there."""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from flightlog.proto.errors import ConfigError, SecretError
from flightlog.proto.osutil import PRIVATE_FILE_MODE, make_dirs

__all__ = ["CREDENTIAL_KEYS", "SecretStore", "FileSecretStore", "KeyringSecretStore", "check_name", "config_dir",
           "secret_store", "resolve", "credential", "is_reference", "resolve_config_refs", "SECRETS_FILE"]

#: The dotted config keys that hold credentials: a reference only, resolved where the credential is used.
CREDENTIAL_KEYS = frozenset({"tracking.mlflow_username", "tracking.mlflow_password", "tracking.mlflow_token",
                             "tracking.wandb_api_key"})
SECRETS_FILE = "secrets.json"
_SERVICE = "flightlog"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_REF = re.compile(r"\$\{(secret|env):([^}]*)\}")
_MAX_FILE = 1 << 20


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise SecretError(f"secret name {name[:140]!r} is not valid: use 1-128 letters, digits, '_', '.' or '-'")
    return name


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/flightlog``, else ``~/.config/flightlog``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "flightlog"


class SecretStore(Protocol):
    where: str

    def get(self, name: str) -> str | None: ...
    def set(self, name: str, value: str) -> None: ...
    def delete(self, name: str) -> bool: ...
    def names(self) -> list[str]: ...


class FileSecretStore:
    """``<config dir>/secrets.json``, mode 0600 in a 0700 directory; refused when others can read it, it is
    not ours, or it is a symlink. Rewritten whole through a temporary file and a rename."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / SECRETS_FILE
        self.where = str(self.path)

    def _read(self) -> dict[str, str]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
            raise SecretError(f"the secret store {self.path} {why}; remove it and set the secrets again") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise SecretError(f"the secret store {self.path} must be a file of yours with mode 0600 (it is "
                                  f"{stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}): run `chmod 600 {self.path}`")
            raw = os.read(fd, _MAX_FILE + 1)
        finally:
            os.close(fd)
        if len(raw) > _MAX_FILE:
            raise SecretError(f"the secret store {self.path} is over {_MAX_FILE} bytes; it is not flightlog's")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise SecretError(f"the secret store {self.path} is not valid JSON: {exc}") from exc
        secrets = data.get("secrets") if isinstance(data, dict) else None
        if not isinstance(secrets, dict) or not all(isinstance(v, str) for v in secrets.values()):
            raise SecretError(f"the secret store {self.path} is not flightlog's (no 'secrets' of strings)")
        return {str(k): v for k, v in secrets.items()}

    def _write(self, secrets: Mapping[str, str]) -> None:
        make_dirs(self.path.parent)
        tmp = self.path.with_name(f".{SECRETS_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        try:
            os.write(fd, json.dumps({"v": 1, "secrets": dict(secrets)}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def get(self, name: str) -> str | None:
        return self._read().get(check_name(name))

    def set(self, name: str, value: str) -> None:
        secrets = self._read()
        secrets[check_name(name)] = value
        self._write(secrets)

    def delete(self, name: str) -> bool:
        secrets = self._read()
        if secrets.pop(check_name(name), None) is None:
            return False
        self._write(secrets)
        return True

    def names(self) -> list[str]:
        return sorted(self._read())


class KeyringSecretStore:
    """The OS keyring (service "flightlog"); the names are kept in a 0600 index file (a keyring cannot list)."""

    def __init__(self, keyring: Any) -> None:
        self._kr = keyring
        self._index = FileSecretStore(config_dir() / "secret-names.json")
        self.where = f"the keyring ({type(keyring.get_keyring()).__name__})"

    def get(self, name: str) -> str | None:
        value: str | None = self._kr.get_password(_SERVICE, check_name(name))
        return value

    def set(self, name: str, value: str) -> None:
        self._kr.set_password(_SERVICE, check_name(name), value)
        self._index.set(name, "")

    def delete(self, name: str) -> bool:
        try:
            self._kr.delete_password(_SERVICE, check_name(name))
        except self._kr.errors.PasswordDeleteError:
            return bool(self._index.delete(name))
        self._index.delete(name)
        return True

    def names(self) -> list[str]:
        return self._index.names()


def _real_keyring() -> Any | None:
    """The keyring module when it has a backend that really stores (not the fail or null one)."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    try:
        kr = keyring.get_keyring()
    except (keyring.errors.KeyringError, RuntimeError, ValueError, ImportError):
        return None  # a broken keyring configuration: the file store works anyway
    if isinstance(kr, fail.Keyring) or "null" in type(kr).__module__ or getattr(kr, "priority", 0) <= 0:
        return None
    # A chainer with no backends behind it stores nothing either.
    if type(kr).__name__ == "ChainerBackend" and not getattr(kr, "backends", None):
        return None
    return keyring


def secret_store(backend: str | None = None) -> SecretStore:
    """The store to use: ``FLIGHTLOG_SECRETS_BACKEND`` (``file`` or ``keyring``), else the keyring when it has a
    real backend, else the file."""
    choice = backend or os.environ.get("FLIGHTLOG_SECRETS_BACKEND", "auto")
    if choice == "file":
        return FileSecretStore()
    kr = _real_keyring()
    if choice == "keyring" and kr is None:
        raise SecretError("FLIGHTLOG_SECRETS_BACKEND=keyring but no keyring backend is available here; "
                          "unset it to use the 0600 file store")
    if choice not in ("auto", "keyring"):
        raise SecretError(f"FLIGHTLOG_SECRETS_BACKEND={choice!r}: use file, keyring or leave it unset")
    return KeyringSecretStore(kr) if kr is not None else FileSecretStore()


def is_reference(value: Any) -> bool:
    """True for a string that is exactly one ``${secret:NAME}`` or ``${env:NAME}``."""
    return isinstance(value, str) and _REF.fullmatch(value) is not None


def resolve(text: str, *, env: Mapping[str, str] | None = None, store: SecretStore | None = None,
            where: str = "a config value") -> str:
    """``text`` with each reference replaced by its value; SecretError naming a missing one and the fix."""
    env = os.environ if env is None else env

    def one(m: re.Match[str]) -> str:
        kind, name = m.group(1), m.group(2)
        if kind == "env":
            if name not in env:
                raise SecretError(f"{where}: ${{env:{name}}} is not set in the environment of process "
                                  f"{os.getpid()}; export {name} or change the reference")
            return env[name]
        nonlocal store
        store = store or secret_store()
        value = store.get(check_name(name))
        if value is None:
            raise SecretError(f"{where}: secret {name!r} is not in {store.where}; run "
                              f"`flightlog secrets set {name}` (the value is read from stdin)")
        return value

    return _REF.sub(one, text)


def credential(value: str, key: str, error: type[Exception] = SecretError) -> str:
    """The value of credential key ``key`` (a reference, or a user name written out), looked up now; a missing
    secret raises ``error`` (a sink passes PermanentBackendError: the run waits on that sink, the rest flows)."""
    try:
        return resolve(value, where=key)
    except SecretError as exc:
        raise error(f"{exc}; then replay the sink's quarantine") from exc


def resolve_config_refs(data: dict[str, Any], origin: Callable[[str], str],
                        env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The loader's pass over merged config data: credential keys must hold one reference (kept as it is);
    ``${env:NAME}`` elsewhere is replaced; ``${secret:NAME}`` elsewhere is refused. ``origin(key)`` names
    where a key's value came from, for the error."""
    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{prefix}[{i}]") for i, v in enumerate(node)]
        if prefix in CREDENTIAL_KEYS:
            if node is None or is_reference(node) or (prefix == "tracking.mlflow_username" and
                                                      isinstance(node, str) and "${" not in node):
                return node  # a user name may be written out; never a password, token or key
            raise ConfigError(f"{prefix} (from {origin(prefix)}) holds a credential written out; store it with "
                              f"`flightlog secrets set NAME` and write {prefix.rsplit('.', 1)[1]}: ${{secret:NAME}}")
        if isinstance(node, str) and "${" in node:
            if "${secret:" in node:
                raise ConfigError(f"{prefix} (from {origin(prefix)}): ${{secret:...}} is only allowed in the "
                                  f"credential keys ({', '.join(sorted(CREDENTIAL_KEYS))}); a secret elsewhere "
                                  "would be logged with the run's config")
            if _REF.search(node):
                return resolve(node, env=env, where=f"{prefix} (from {origin(prefix)})")
        return node

    out: dict[str, Any] = walk(data, "")
    return out
