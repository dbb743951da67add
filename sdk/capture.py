"""Reproducibility capture (environment, git, command line, seed) and secret redaction.

Everything here runs once at run start, in the training process; none of it imports torch unless the
caller already did (or asks for seeding).
"""
from __future__ import annotations

import os
import platform
import random
import re
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flightlog.proto.secrets import is_reference

__all__ = [
    "MASK",
    "DEFAULT_SECRET_WORDS",
    "ENV_ALLOW",
    "redact",
    "redact_value",
    "redact_capture",
    "strip_url_credentials",
    "is_secret_key",
    "capture_environment",
    "capture_git",
    "capture_command",
    "installed_packages",
    "seed_everything",
    "last_seed",
    "reset",
]

MASK = "***"

#: A key is a secret when one of its words (split on ``_ - . space`` and camelCase) or two adjacent words
#: joined is one of these. ``max_tokens`` or ``tokenizer`` are not; ``hf_token`` or ``apiKey`` are.
DEFAULT_SECRET_WORDS: frozenset[str] = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "apikey", "accesskey",
    "secretkey", "privatekey", "sessionkey", "signingkey", "credential", "credentials", "auth",
    "authorization", "cookie", "dsn", "bearer", "clientsecret",
})
#: ``pad_token`` & co. are tokenizer settings, not credentials.
_TOKEN_NOT_SECRET_AFTER = frozenset({
    "pad", "bos", "eos", "unk", "sep", "cls", "mask", "start", "end", "special", "max", "min", "num", "n",
    "image", "vision", "audio", "video", "stop", "begin", "added",
})

_WORD_SPLIT = re.compile(r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])")
#: ``scheme://user:pass@host`` or ``scheme://token@host``: everything between ``//`` and ``@``.
_URL_CREDS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<creds>[^/\s@?#]+)@")
#: Well-known token shapes, masked whatever the key is called.
_TOKEN_VALUE = re.compile(
    r"^(?:ghp_|gho_|ghs_|ghu_|github_pat_|glpat-|hf_|sk-|sk_live_|xox[abpr]-|AKIA|ASIA)[A-Za-z0-9_\-]{16,}$"
)

# Extra secret words from the environment: FLIGHTLOG_REDACT_KEYS=my_field,other (comma separated).
_ENV_REDACT = "FLIGHTLOG_REDACT_KEYS"


def _extra_words() -> frozenset[str]:
    raw = os.environ.get(_ENV_REDACT, "")
    return frozenset(w.strip().lower().replace("_", "").replace("-", "") for w in raw.split(",") if w.strip())


def is_secret_key(key: str, words: Iterable[str] | None = None) -> bool:
    """True when ``key`` looks like the name of a credential (see DEFAULT_SECRET_WORDS)."""
    vocab = DEFAULT_SECRET_WORDS if words is None else frozenset(words)
    parts = [p.lower() for p in _WORD_SPLIT.split(str(key)) if p]
    if not parts:
        return False
    if "".join(parts) in vocab:  # the whole key (apikey, api_key, API-Key)
        return True
    for i, p in enumerate(parts):
        if p in vocab:
            if p == "token" and i > 0 and parts[i - 1] in _TOKEN_NOT_SECRET_AFTER:
                continue
            return True
        if i and parts[i - 1] + p in vocab:  # api+key, access+key, private+key
            return True
    return False


def strip_url_credentials(text: str) -> str:
    """``https://user:pass@host/x`` → ``https://host/x``, anywhere in ``text``."""
    if "@" not in text or "://" not in text:
        return text
    return _URL_CREDS.sub(r"\g<scheme>", text)


def redact_value(value: Any) -> Any:
    """A value with URL credentials stripped and well-known token shapes masked (recursively)."""
    if isinstance(value, str):
        if _TOKEN_VALUE.match(value):
            return MASK
        return strip_url_credentials(value)
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


def redact(mapping: Mapping[str, Any], extra_keys: Iterable[str] = (), *, words: Iterable[str] | None = None,
           mask: str = MASK) -> dict[str, Any]:
    """A copy of ``mapping`` where secret-looking keys have their value replaced by ``mask`` and URL
    credentials are stripped from every string, at any depth (dicts and lists).

    ``extra_keys`` (and the ``FLIGHTLOG_REDACT_KEYS`` variable) add words; ``words`` replaces the default set.
    """
    vocab = frozenset(DEFAULT_SECRET_WORDS if words is None else words)
    vocab = vocab | _extra_words() | {k.lower().replace("_", "").replace("-", "") for k in extra_keys}
    return _redact(mapping, vocab, mask)


def _redact(mapping: Mapping[Any, Any], vocab: frozenset[str], mask: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(key, str) and not _harmless(value) and is_secret_key(key, vocab):
            # A nested section named e.g. `auth` is masked whole: its parts are all credentials.
            out[key] = mask
        elif isinstance(value, Mapping):
            out[key] = _redact(value, vocab, mask)
        elif isinstance(value, (list, tuple)):
            out[key] = [_redact(v, vocab, mask) if isinstance(v, Mapping) else redact_value(v) for v in value]
        else:
            out[key] = redact_value(value)
    return out


def redact_capture(info: Mapping[str, Any]) -> dict[str, Any]:
    """The reproducibility capture with secrets masked, except its package list: its keys are distribution
    names (``google-auth``, ``python-secrets``, ``token-bucket``), not the names of settings, and its values
    are version strings, which are never masked."""
    env = info.get("environment")
    if not isinstance(env, Mapping) or not isinstance(packages := env.get("packages"), Mapping):
        return redact(info)
    out = redact({**info, "environment": {k: v for k, v in env.items() if k != "packages"}})
    out["environment"]["packages"] = {str(k): str(v) for k, v in packages.items()}
    return out


def _harmless(value: Any) -> bool:
    """Values that cannot hold a credential (flags, empty fields) stay visible under any key."""
    return value is None or isinstance(value, bool) or (isinstance(value, (str, dict, list, tuple)) and not value) \
        or is_reference(value)  # ${secret:NAME}: names a secret, holds none; the agent resolves it where used


def _redact_argv(argv: list[str]) -> list[str]:
    """``--api-key X``, ``--token=X`` and URL credentials removed from a command line."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        if arg.startswith("-"):
            name, eq, _value = arg.lstrip("-").partition("=")
            if is_secret_key(name, DEFAULT_SECRET_WORDS | _extra_words()):
                if eq:
                    out.append(arg[: arg.index("=") + 1] + MASK)
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(redact_value(arg))
    return out


# --- environment -----------------------------------------------------------------------------------------

#: Environment variables recorded (exact names, and prefixes ending in ``_``); nothing else is read.
ENV_ALLOW: tuple[str, ...] = (
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "CONDA_DEFAULT_ENV", "VIRTUAL_ENV", "PYTORCH_CUDA_ALLOC_CONF",
    "TOKENIZERS_PARALLELISM", "SLURM_", "NCCL_", "TORCH_", "TORCHELASTIC_", "PBS_JOBID", "LSB_JOBID",
)

_packages_cache: dict[str, str] | None = None
_cache_lock = threading.Lock()


def installed_packages() -> dict[str, str]:
    """name -> version of every distribution on sys.path, from the ``*.dist-info`` folder names.

    Much faster than importlib.metadata (no METADATA parsing); cached for the process.
    """
    global _packages_cache
    with _cache_lock:
        if _packages_cache is not None:
            return dict(_packages_cache)
        found: dict[str, str] = {}
        for entry in sys.path:
            try:
                names = os.listdir(entry or ".")
            except OSError:
                continue
            for name in names:
                if name.endswith(".dist-info"):
                    stem = name[: -len(".dist-info")]
                elif name.endswith(".egg-info"):
                    stem = name[: -len(".egg-info")]
                else:
                    continue
                dist, sep, version = stem.partition("-")
                if sep:
                    found.setdefault(dist.replace("_", "-").lower(), version.split("-")[0])
        _packages_cache = found
        return dict(found)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> dict[str, Any]:
    """GPU names and driver version through NVML, when a driver is there; CUDA version from torch if loaded."""
    out: dict[str, Any] = {}
    torch = sys.modules.get("torch")  # never import torch here: it costs seconds
    if torch is not None:
        out["torch"] = str(getattr(torch, "__version__", ""))  # a str subclass: keep it plain
        version = getattr(torch, "version", None)
        out["cuda"] = str(getattr(version, "cuda", None) or "")
        backends = getattr(torch, "backends", None)
        cudnn = getattr(backends, "cudnn", None)
        try:
            out["cudnn"] = cudnn.version() if cudnn is not None else None
        except Exception:  # an odd build; the version is nice to have, not needed
            out["cudnn"] = None
    try:
        import pynvml
    except ImportError:
        return out
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: nothing to record
        return out
    try:
        out["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            out["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
        except Exception:
            pass
        out["gpus"] = [
            _text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def capture_environment(env: Mapping[str, str] | None = None, *, packages: bool = True) -> dict[str, Any]:
    """Python, OS, host, CPU, RAM, GPUs, package versions and allow-listed environment variables."""
    import psutil

    env = os.environ if env is None else env
    allowed = {
        k: v for k, v in env.items()
        if any(k == a or (a.endswith("_") and k.startswith(a)) for a in ENV_ALLOW)
    }
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "os": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "ram_bytes": int(psutil.virtual_memory().total),
        "env": redact(allowed),
    }
    out.update(_gpus())
    if packages:
        out["packages"] = installed_packages()
    return out


def capture_command(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv if argv is None else argv)
    return {"argv": _redact_argv(argv), "cwd": os.getcwd(), "executable": sys.executable}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.decode("utf-8", errors="replace")


def capture_git(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], str]:
    """(info, diff): commit, branch, dirty flag, remote URL without credentials; diff of uncommitted changes
    (staged and not, against HEAD). ``({}, "")`` outside a repository or without git."""
    cwd = Path(path or os.getcwd())
    top = _git(["rev-parse", "--show-toplevel"], cwd)
    if top is None:
        return {}, ""
    root = Path(top.strip())
    info: dict[str, Any] = {"root": str(root)}
    commit = _git(["rev-parse", "HEAD"], root)
    info["commit"] = commit.strip() if commit else ""
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], root)
    info["branch"] = branch.strip() if branch else ""
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    info["dirty"] = bool(status and status.strip())
    untracked = _git(["ls-files", "--others", "--exclude-standard"], root)
    info["untracked_files"] = len(untracked.splitlines()) if untracked else 0
    remotes: dict[str, str] = {}
    for line in (_git(["remote", "-v"], root) or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] not in remotes:
            remotes[parts[0]] = strip_url_credentials(parts[1])
    info["remotes"] = remotes
    info["remote_url"] = remotes.get("origin") or next(iter(remotes.values()), "")
    diff = (_git(["diff", "HEAD", "--binary"], root) if info["commit"] else None) or ""
    info["diff_bytes"] = len(diff.encode())
    return info, diff


# --- seeding ---------------------------------------------------------------------------------------------

_seed_state: dict[str, Any] = {}
_seed_listeners: weakref.WeakSet[Any] = weakref.WeakSet()


def seed_everything(seed: int, deterministic: bool = False) -> dict[str, Any]:
    """Seed python's ``random``, numpy and torch (CPU and every GPU) if installed; record the seed.

    ``deterministic=True`` also asks torch for deterministic kernels (cuDNN deterministic, no benchmark,
    ``use_deterministic_algorithms(warn_only=True)``, ``CUBLAS_WORKSPACE_CONFIG``); slower, reproducible.
    Trackers alive now and created later record ``seed`` and ``deterministic``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses (DataLoader workers started by spawn)
    seeded = ["random"]
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
        seeded.append("numpy")
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.manual_seed(seed)  # seeds every CUDA device too
        seeded.append("torch")
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_state.clear()
    _seed_state.update({"seed": seed, "deterministic": deterministic, "seeded": seeded})
    for tracker in list(_seed_listeners):
        tracker._record_seed(dict(_seed_state))
    return dict(_seed_state)


def last_seed() -> dict[str, Any]:
    """What the last seed_everything call did ({} if none)."""
    return dict(_seed_state)


def _listen_for_seed(tracker: Any) -> None:
    _seed_listeners.add(tracker)


def reset() -> None:
    """Forget the recorded seed, the listeners and the package cache (tests)."""
    global _packages_cache
    _seed_state.clear()
    _seed_listeners.clear()
    with _cache_lock:
        _packages_cache = None
