"""Experiment configuration: YAML (with ``extends:``), dicts and ``FLIGHTLOG_*`` overrides decoded into
typed msgspec Structs, plus the stable hash that identifies an experiment.

Every input is outside bytes: a file, an ``extends`` graph, an environment variable. Each is read in bounded
time and memory (size, values, nesting and file-count limits below) and any failure is a ConfigError."""
from __future__ import annotations

import hashlib
import os
import re
import stat
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from flightlog.proto.errors import ConfigError
from flightlog.proto.secrets import resolve_config_refs

__all__ = [
    "TrackingConfig",
    "CheckpointConfig",
    "MonitoringConfig",
    "AgentConfig",
    "WalConfig",
    "DistributedConfig",
    "NotifyConfig",
    "AccessConfig",
    "Config",
    "parse_address",
    "load_config",
    "config_hash",
    "config_to_dict",
    "decode_config",
    "MAX_CONFIG_BYTES",
]

# Every number has a range: a value that validates must also fit where it goes (an int64 column, an OS timer:
# threading and select refuse timeouts past ~2**63 ns). 10**9 s is about 31 years.
_I64 = 2**63 - 1
_MAX_SECONDS = 1e9
_NonNegInt = Annotated[int, Meta(ge=0, le=_I64)]
_PosInt = Annotated[int, Meta(gt=0, le=_I64)]
_Millis = Annotated[int, Meta(ge=0, le=int(_MAX_SECONDS) * 1000)]
_PosMillis = Annotated[int, Meta(gt=0, le=int(_MAX_SECONDS) * 1000)]
_NonNegFloat = Annotated[float, Meta(ge=0, le=_MAX_SECONDS)]
_PosFloat = Annotated[float, Meta(gt=0, le=_MAX_SECONDS)]


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Shared options: subclasses inherit them, so a typo in any section is an error, never ignored."""


class TrackingConfig(_Section):
    use_wandb: bool = False
    wandb_project: str = "flightlog"
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    wandb_dir: str | None = None
    use_tensorboard: bool = True
    tensorboard_log_dir: str = "logs/tensorboard"
    use_mlflow: bool = False
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    mlflow_experiment_name: str | None = None
    # Credentials: a ${secret:NAME} or ${env:NAME} reference only, resolved by the sink (flightlog.proto.secrets)
    mlflow_username: str | None = None
    mlflow_password: str | None = None
    mlflow_token: str | None = None
    wandb_api_key: str | None = None


class CheckpointConfig(_Section):
    checkpoint_dir: str = "checkpoints"
    max_checkpoints: _NonNegInt = 10  # 0 keeps all
    save_frequency: _NonNegInt = 0  # 0: only explicit saves
    compression: Literal["zstd", "gzip", "none", "zstd-bytegroup"] = "zstd"
    compression_level: Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)] = 1  # zstd 1 packs tensors as well as 3, at 1.6x the speed; range checked by the writer
    monitor: str | None = "val_loss"  # the metric that picks the best checkpoint (null: only is_best=)
    mode: Literal["min", "max"] = "min"
    keep_every_n_steps: _NonNegInt = 0
    upload: Literal["none", "best", "all"] = "none"
    min_free_bytes: _NonNegInt = 0
    dcp_async: bool = False  # distributed saves: dcp.async_save (the loop waits for the copy only), not dcp.save
    dcp_timeout_seconds: _PosFloat = 1800.0  # collectives of distributed saves/loads give up after this
    # Encryption at rest (flightlog.proto.checkpoint.crypto). Keys come from one provider: key_command if set,
    # else key_file (mode 0600) if set, else the variable key_env; each holds `[ID:]BASE64` keys, first one seals.
    encryption: Literal["none", "aes-256-gcm"] = "none"
    key_env: str = "FLIGHTLOG_CHECKPOINT_KEY"
    key_file: str | None = None
    key_command: str | list[str] | None = None  # argv (a string is split like a shell would, but runs without one)
    key_command_timeout_seconds: _PosFloat = 30.0


class MonitoringConfig(_Section):
    log_gpu_usage: bool = True
    log_memory_usage: bool = True
    create_plots: bool = True
    interval_seconds: _PosFloat = 10.0  # MLflow samples system metrics every 10 s, W&B every 15 s
    plot_every_minutes: Annotated[float, Meta(ge=0, le=_MAX_SECONDS / 60)] = 0.0
    all_gpus: bool = False
    disk_free_floor_bytes: _NonNegInt = 1 << 30


_RING_MIN, _RING_MAX = 64 << 10, 1 << 30


class AgentConfig(_Section):
    data_dir: str | None = None
    socket: str | None = None
    autostart: bool = True
    idle_exit_seconds: _NonNegFloat = 5.0
    ring_bytes: int = 8 << 20
    on_full: Literal["spill", "block", "drop"] = "spill"
    block_timeout_seconds: _NonNegFloat = 5.0
    connect_timeout_seconds: _PosFloat = 10.0
    #: Events are gathered for this long (ingest's batching window) and a sink delivers when its batch is full
    #: or its oldest event waited this long: fewer wake-ups at a trickle, for at most this much delay.
    linger_ms: _Millis = 300
    #: ``host:port`` of the Prometheus ``/metrics`` endpoint (e.g. ``127.0.0.1:9464``); None: off.
    metrics_address: str | None = None

    def __post_init__(self) -> None:
        # The ring indexes its data area with a mask, so the size must be a power of two.
        n = self.ring_bytes
        if not (_RING_MIN <= n <= _RING_MAX and n & (n - 1) == 0):
            # "field: ..." lets the error translator point at the key, not just the section.
            raise ValueError(
                f"ring_bytes: {n} is not a power of two between 64 KiB ({_RING_MIN}) and 1 GiB ({_RING_MAX});"
                f" use e.g. {8 << 20} (8 MiB)"
            )
        if self.metrics_address is not None:
            try:
                parse_address(self.metrics_address)
            except ValueError as exc:
                raise ValueError(f"metrics_address: {exc}") from None


class NotifyConfig(_Section):
    """Who hears about trouble: the trainer's stderr (after ``after_seconds`` of retries, or at once when a sink
    parks the run) and, with ``webhook_url``, a Slack-compatible webhook (``{"text": ...}``)."""

    after_seconds: _NonNegFloat = 30.0
    finish_wait_seconds: _NonNegFloat = 1.0  # finish(): wait this long at most for the sinks' summary
    webhook_url: str | None = None
    nan_keys: list[str] = msgspec.field(default_factory=lambda: ["*"])  # fnmatch patterns of keys to watch

    def __post_init__(self) -> None:
        # In a run's config: that run's webhook; in the agent's own config: the node's, for every run.
        if self.webhook_url is not None and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError("webhook_url: not an http(s) URL (e.g. https://hooks.slack.com/services/...)")


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) as (host, port); ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host, int(port)


class WalConfig(_Section):
    fsync: Literal["interval", "always", "never"] = "interval"
    fsync_ms: _PosMillis = 100
    segment_bytes: _PosInt = 64 << 20
    max_bytes: _NonNegInt = 0  # 0: no cap


class DistributedConfig(_Section):
    #: "zero": backends get rank 0's metrics (every rank's stay in the local store); "all": every rank's,
    #: under ``rank<k>/<key>``.
    log_ranks: Literal["zero", "all"] = "zero"


class AccessConfig(_Section):
    #: Share runs and checkpoints with this group (files 0640, folders 0750, group-owned); None: private.
    group: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    #: A node-wide agent run as a service account: serves every uid, each run readable by its owner, the group
    #: and root (also `flightlog agent --multi-user`).
    multi_user: bool = False


class Config(_Section):
    description: str = ""
    tags: list[str] = msgspec.field(default_factory=list)
    #: The user's own sections of the experiment config (``model:``, ``training:``, ``data:`` ...): every
    #: top-level key flightlog does not own lands here, kept as written; logged as the run's
    #: hyper-parameters and covered by ``config_hash``.
    experiment: dict[str, Any] = msgspec.field(default_factory=dict)
    tracking: TrackingConfig = msgspec.field(default_factory=TrackingConfig)
    checkpointing: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)
    monitoring: MonitoringConfig = msgspec.field(default_factory=MonitoringConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    wal: WalConfig = msgspec.field(default_factory=WalConfig)
    distributed: DistributedConfig = msgspec.field(default_factory=DistributedConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)
    access: AccessConfig = msgspec.field(default_factory=AccessConfig)


_Source = Union[str, os.PathLike[str], Mapping[str, Any], Config, None]
_Origins = dict[str, str]  # dotted key path -> where its value came from (file, "dict", env var)

_ENV_PREFIX = "FLIGHTLOG_"
_FLAT_KEYS = ("checkpoint_dir", "max_checkpoints", "save_frequency", "compression")


def _fields(cls: Any) -> dict[str, Any]:
    """Field name -> type of a Struct class; {} for anything else (a leaf has no keys below it)."""
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        return {f.name: f.type for f in msgspec.structs.fields(cls)}
    return {}


_SECTIONS = [name for name, tp in _fields(Config).items() if _fields(tp)]


def load_config(source: _Source = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Resolve ``source`` (None, a YAML path, a dict or a Config) plus ``FLIGHTLOG_*`` overrides into a Config.

    Raises ConfigError naming the key, the source (file, "dict" or variable) and the fix.
    """
    env = os.environ if env is None else env
    if isinstance(source, Config):
        data: dict[str, Any] = msgspec.to_builtins(source)
        origins: _Origins = {}
        default_src = "Config object"
        if not _apply_env(data, origins, env):
            return source  # nothing to override: hand back the caller's object untouched
    elif source is None:
        data, origins, default_src = {}, {}, "defaults"
        _apply_env(data, origins, env)
    elif isinstance(source, Mapping):
        default_src = "dict"
        _check_shape(source, "dict", _Budget())  # a dict may hold itself: nothing below may recurse into that
        data, origins = _resolve(source, default_src, Path.cwd(), [], _Loading())
        _apply_env(data, origins, env)
    elif isinstance(source, (str, os.PathLike)):
        default_src = os.fspath(source)
        data, origins = _load_file(Path(source), [], _Loading())
        _apply_env(data, origins, env)
    else:
        raise ConfigError(f"load_config: unsupported source {type(source).__name__}; pass a path, dict or Config")
    data = resolve_config_refs(data, lambda key: _origin(key, origins, default_src), env)
    try:
        return msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise _translate(str(exc), origins, default_src) from exc


def config_hash(config: Config | Mapping[str, Any] | str | os.PathLike[str],
                params: Mapping[str, Any] | None = None) -> str:
    """sha256 hex of the resolved config's canonical JSON, without the node-local ``agent`` section; with
    ``params`` (the hyper-parameters a run logged), of both: two runs that differ only in a logged learning
    rate differ in hash. No params or ``{}``: the config's hash alone."""
    if isinstance(config, Config):
        # Re-validate so a hand-built Config (an int where a float is due) hashes like its loaded twin.
        try:
            cfg = msgspec.convert(msgspec.to_builtins(config), Config)
        except msgspec.ValidationError as exc:
            raise _translate(str(exc), {}, "Config object") from exc
    else:
        cfg = load_config(config, env={})  # env={}: the identity must not depend on the shell
    data = msgspec.to_builtins(cfg)
    del data["agent"], data["access"]  # node-local: who may read a run is not what the experiment is
    del data["notify"]  # who is told about trouble does not change the experiment
    if params:
        data = {"config": data, "params": msgspec.to_builtins(params, enc_hook=repr)}
    return hashlib.sha256(msgspec.json.encode(data, order="sorted")).hexdigest()


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain builtins (dicts, lists, scalars) of ``config``, e.g. for logging it as run parameters."""
    out: dict[str, Any] = msgspec.to_builtins(config)
    return out


def decode_config(data: Any) -> tuple[Config, list[str]]:
    """A Config from builtins that were resolved elsewhere: a run's config as its SDK sent it, the settings a
    sidecar is started with. The agent reads every setting from the Structs, so defaults live only there.

    Lenient where ``load_config`` is strict, because these bytes come from another process, maybe of another
    version: a key this version does not know is dropped, and a value that does not validate falls back to
    its default; each is one line of the returned problems (``section.key: what``), for the caller to log
    with the name of the run or file. Never raises for the data's sake.
    """
    problems: list[str] = []
    if not isinstance(data, Mapping):
        if data is not None:
            problems.append(f"<top level>: a mapping was expected, got {type(data).__name__}; defaults are used")
        return Config(), problems
    good: dict[str, Any] = {}
    for name, value in data.items():
        ftype = _fields(Config).get(name)
        if ftype is None:
            problems.append(f"{name}: unknown key, ignored")
        elif _fields(ftype):
            good[name] = _valid_keys(ftype, name, value if value is not None else {}, problems)
        elif _valid(Config, name, value, problems, name):
            good[name] = value
    return msgspec.convert(good, Config), problems


def _valid_keys(section: type[_Section], name: str, value: Any, problems: list[str]) -> dict[str, Any]:
    """The keys of one section that validate on their own (every section key has a default)."""
    if not isinstance(value, Mapping):
        problems.append(f"{name}: a mapping was expected, got {type(value).__name__}; defaults are used")
        return {}
    fields = _fields(section)
    out = {}
    for key, v in value.items():
        if key not in fields:
            problems.append(f"{name}.{key}: unknown key, ignored")
        elif _valid(section, key, v, problems, f"{name}.{key}"):
            out[key] = v
    return out


def _valid(struct: type[msgspec.Struct], key: str, value: Any, problems: list[str], where: str) -> bool:
    try:
        msgspec.convert({key: value}, struct)  # the field alone, with its __post_init__ check
    except msgspec.ValidationError as exc:
        problem = re.sub(r" - at `\$[^`]*`$", "", str(exc)).removeprefix(f"{key}: ")  # a __post_init__ names it
        problems.append(f"{where}: {problem[:1].lower()}{problem[1:]}; its default is used")
        return False
    return True


# --- loading -------------------------------------------------------------------------------------------


#: A config file larger than this is refused before it is parsed (a real one is a few KiB).
MAX_CONFIG_BYTES = 1 << 20
_MAX_ENV_BYTES = 64 << 10  # one FLIGHTLOG_* value
_MAX_FILES = 64  # distinct files in one ``extends`` graph
_MAX_DEPTH = 32  # nesting of mappings and lists (and the chain of ``extends``)
_MAX_VALUES = 50_000  # values of one load, aliases counted each time they are used
_MAX_TEXT = 4 << 20  # characters of strings and keys of one load, aliases counted each time


class _Budget:
    """What one ``load_config`` may still spend on values and text (shared by its files and variables)."""

    def __init__(self) -> None:
        self.values = _MAX_VALUES
        self.text = _MAX_TEXT


class _Loading:
    """One load's ``extends`` graph: each file is read and resolved once (a diamond is not re-read per path)."""

    def __init__(self) -> None:
        self.done: dict[Path, tuple[dict[str, Any], _Origins]] = {}
        self.budget = _Budget()


def _load_file(path: Path, stack: list[Path], loading: _Loading) -> tuple[dict[str, Any], _Origins]:
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}; check the path") from exc
    if real in stack:
        chain = " -> ".join(str(p) for p in [*stack[stack.index(real):], real])
        raise ConfigError(f"extends cycle: {chain}; remove one of these `extends:` entries")
    if real in loading.done:
        return loading.done[real]
    if len(stack) >= _MAX_DEPTH or len(loading.done) >= _MAX_FILES:
        raise ConfigError(f"{path}: the `extends` graph goes past {_MAX_DEPTH} levels or {_MAX_FILES} files "
                          f"(reached through {stack[-1] if stack else path}); flatten the config files")
    raw = _parse_yaml(_read_config_text(path), str(path), loading.budget)
    loading.done[real] = out = _resolve(raw, str(path), real.parent, [*stack, real], loading)
    return out


def _read_config_text(path: Path) -> str:
    """The file's text; only a regular file of at most MAX_CONFIG_BYTES (a FIFO, /dev/zero or a 200 MB file
    would otherwise hang or read for minutes). O_NONBLOCK: opening a FIFO must not wait for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot read config file {path}: {why}; check the path") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"config file {path} is not a regular file ({stat.filemode(mode)}); "
                              "point at a YAML file")
        try:
            data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}; check the path") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes (1 MiB), the limit for one "
                          "config file; split it with `extends:` or remove what is not configuration")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (bad byte at offset {exc.start}); "
                          "save it as UTF-8") from exc


def _parse_yaml(text: str, where: str, budget: _Budget, fix: str = "fix the file") -> Any:
    """``yaml.safe_load`` in bounded time and memory: the event stream is checked for depth and size before
    a node is composed, the node graph for alias expansion (billion laughs) and self-reference before a
    Python value is built."""
    import yaml  # lazy: keeps `import flightlog` fast

    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 5x faster on a big file
    try:
        _check_events(yaml.parse(text, Loader=loader_cls), where, budget)
        loader = loader_cls(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_nodes(node, where, budget)
            try:
                return loader.construct_document(node)
            except ValueError as exc:  # a scalar that resolves to a bad value: `2001-02-30` is a "date"
                raise ConfigError(f"YAML value error in {where}: {exc}; {fix} (quote a value meant as text)") from exc
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"{where}, line {mark.line + 1}, column {mark.column + 1}" if mark else where
        raise ConfigError(f"YAML syntax error in {at}: {exc.problem or exc}; {fix}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error in {where}: {exc}; {fix}") from exc
    except RecursionError as exc:  # defensive: the checks above keep every recursion shallow
        raise ConfigError(f"{where}: nested too deeply; flatten it") from exc


def _too_deep(where: str) -> ConfigError:
    return ConfigError(f"{where}: values nested more than {_MAX_DEPTH} levels deep (or an anchor that contains "
                       "itself); a config is a few levels deep: flatten it")


def _too_big(where: str) -> ConfigError:
    return ConfigError(f"{where}: more than {_MAX_VALUES} values or {_MAX_TEXT} characters once YAML aliases are "
                       "expanded (an alias bomb?); remove the anchors and aliases or shrink the config")


def _check_events(events: Iterable[Any], where: str, budget: _Budget) -> None:
    import yaml

    depth, values = 0, budget.values
    for ev in events:
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > _MAX_DEPTH:
                raise _too_deep(where)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        values -= 1
        if values < 0:
            raise _too_big(where)


def _check_nodes(root: Any, where: str, budget: _Budget) -> None:
    """Walk the node graph as it would expand (aliases are shared nodes), charging ``budget``."""
    import yaml

    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        budget.values -= 1
        if isinstance(node, yaml.ScalarNode):
            budget.text -= len(node.value)
        elif depth > _MAX_DEPTH:
            raise _too_deep(where)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        else:
            stack.extend((child, depth + 1) for pair in node.value for child in pair)
        if budget.values < 0 or budget.text < 0:
            raise _too_big(where)


def _check_shape(value: Any, where: str, budget: _Budget) -> None:
    """The same bounds for values built elsewhere (a dict source), which may even contain themselves."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        budget.values -= 1
        if isinstance(v, str):
            budget.text -= len(v)
        elif isinstance(v, (Mapping, list, tuple)):
            if depth > _MAX_DEPTH:
                raise _too_deep(where)
            items = [x for kv in v.items() for x in kv] if isinstance(v, Mapping) else list(v)
            stack.extend((x, depth + 1) for x in items)
        if budget.values < 0 or budget.text < 0:
            raise _too_big(where)


def _resolve(raw: Any, src: str, base_dir: Path, stack: list[Path],
             loading: _Loading) -> tuple[dict[str, Any], _Origins]:
    """One layer: its bases (``extends:``) first, then this layer deep-merged over them."""
    if raw is None:
        raw = {}  # an empty file is an empty config
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{src}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    data = dict(raw)
    extends = data.pop("extends", None)
    data = _user_sections(_normalise(data, src), src)
    merged: dict[str, Any] = {}
    origins: _Origins = {}
    for base in _as_paths(extends, src):
        base_data, base_origins = _load_file(base_dir / base, stack, loading)
        merged = _merge(merged, base_data)
        origins.update(base_origins)
    _mark(data, src, "", origins)
    return _merge(merged, data), origins


def _as_paths(extends: Any, src: str) -> Iterable[str | os.PathLike[str]]:
    if extends is None:
        return ()
    items = extends if isinstance(extends, list) else [extends]
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ConfigError(f"{src}: `extends` must be a path or a list of paths, got {item!r}")
    return items


def _normalise(data: dict[str, Any], src: str) -> dict[str, Any]:
    """Fold the flat form into ``checkpointing`` and read an empty section (``tracking:``) as {}."""
    for name in _SECTIONS:
        if name in data and data[name] is None:
            data[name] = {}
    section = data.get("checkpointing", {})
    if not isinstance(section, Mapping):
        return data  # leave both as they are: validation names the malformed `checkpointing`
    flat = {k: data.pop(k) for k in _FLAT_KEYS if k in data}
    if flat:
        section = dict(section)
        for key, value in flat.items():
            if key in section and section[key] != value:
                raise ConfigError(
                    f"{src}: `{key}` is set both at the top level ({value!r}) and as `checkpointing.{key}`"
                    f" ({section[key]!r}); keep only one"
                )
            section[key] = value
        data["checkpointing"] = section
    return data


#: Keys a top-level key of the user's may not resemble (it would be a typo of flightlog's, silently kept).
_OWN_KEYS = (*(f for f in _fields(Config) if f != "experiment"), *_FLAT_KEYS, "extends")


def _user_sections(data: dict[str, Any], src: str) -> dict[str, Any]:
    """Move the top-level keys flightlog does not own into ``experiment`` (the user's sections). A key that
    looks like a misspelt flightlog key (``trackng:``) is refused instead: kept, it would silently leave
    that section at its defaults."""
    import difflib

    own = _fields(Config)
    if "experiment" in data and data["experiment"] is None:
        data["experiment"] = {}  # an empty `experiment:` section, as for flightlog's own
    user: dict[str, Any] = {}
    for key in [k for k in data if k not in own and k not in _FLAT_KEYS]:  # a flat key left: bad checkpointing
        if not isinstance(key, str):
            raise ConfigError(f"{src}: top-level key {key!r} is not a string; quote it")
        near = difflib.get_close_matches(key, _OWN_KEYS, n=1, cutoff=0.8)
        if near:
            raise ConfigError(
                f"{src}: unknown key `{key}`: did you mean flightlog's `{near[0]}`? Fix its spelling; a section of"
                f" your own with this name goes under `experiment:` (`experiment: {{{key}: ...}}`)")
        user[key] = data.pop(key)
    if user:
        mine = data.get("experiment")
        if mine is not None and not isinstance(mine, Mapping):
            return data  # validation names the malformed `experiment`
        data["experiment"] = _merge(mine or {}, user)
    return data


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key; lists and scalars in ``over`` replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def _mark(data: Mapping[str, Any], src: str, prefix: str, origins: _Origins) -> None:
    for key, value in data.items():
        path = f"{prefix}{key}"
        origins[path] = src
        if isinstance(value, Mapping):
            _mark(value, src, f"{path}.", origins)


# --- environment overrides -----------------------------------------------------------------------------


def _apply_env(data: dict[str, Any], origins: _Origins, env: Mapping[str, str]) -> bool:
    """Apply ``FLIGHTLOG_<SECTION>__<KEY>`` variables to ``data`` in place; True if any applied."""
    applied = False
    top = Config.__struct_fields__
    for name in sorted(env):
        if not name.upper().startswith(_ENV_PREFIX):
            continue
        key = name[len(_ENV_PREFIX):].lower()
        # Other FLIGHTLOG_* variables (FLIGHTLOG_DATA_DIR, FLIGHTLOG_AGENT_SOCKET) belong to other readers.
        if "__" not in key and key not in top:
            continue
        parts = key.split("__")
        ftype: Any = Config
        node = data
        for i, part in enumerate(parts):
            fields = _fields(ftype)
            if part not in fields:
                where = ".".join(parts[: i + 1])
                valid = f"; valid keys here: {', '.join(fields)}" if fields else ""
                raise ConfigError(
                    f"environment variable {name}: unknown config key `{where}`{valid}; unset or rename it"
                )
            ftype = fields[part]
            if i < len(parts) - 1:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
        path = ".".join(parts)
        value = _parse_env_value(name, env[name], ftype)
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
            node[last] = _merge(node[last], value)
        else:
            node[last] = value
        origins[path] = f"environment variable {name}"
        if isinstance(value, Mapping):
            _mark(value, f"environment variable {name}", f"{path}.", origins)
        applied = True
    return applied


_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _parse_env_value(name: str, raw: str, ftype: Any) -> Any:
    if len(raw) > _MAX_ENV_BYTES:
        raise ConfigError(f"environment variable {name} is {len(raw)} characters long, more than the "
                          f"{_MAX_ENV_BYTES} allowed for one value; shorten it or put it in a config file")
    # A string field keeps the raw text, so FLIGHTLOG_DESCRIPTION=yes or an entity named 1234 stay strings.
    if _accepts(ftype, str):
        return None if _accepts(ftype, type(None)) and raw.strip() in _YAML_NULLS else raw
    return _parse_yaml(raw, f"environment variable {name}", _Budget(), f"{raw[:60]!r} is not a valid YAML value: "
                       "quote or fix it")


def _accepts(tp: Any, kind: type) -> bool:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _accepts(typing.get_args(tp)[0], kind)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, kind) for arg in typing.get_args(tp))
    if origin is Literal:
        return all(isinstance(arg, kind) for arg in typing.get_args(tp))
    return tp is kind


# --- error messages ------------------------------------------------------------------------------------

_AT = re.compile(r"(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.S)


def _translate(message: str, origins: _Origins, default_src: str) -> ConfigError:
    """Turn msgspec's ``Expected `bool`, got `str` - at `$.tracking.use_mlflow``` into a message for people."""
    m = _AT.fullmatch(message)
    problem, path = (m["problem"], (m["path"] or "").lstrip(".")) if m else (message, "")
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", problem)
    if unknown:
        section = path
        path = f"{path}.{unknown[1]}" if path else unknown[1]
        valid = ", ".join(_fields(_type_at(section)))
        what = "unknown key"
        todo = f"remove it or fix its spelling (valid keys{f' in `{section}`' if section else ''}: {valid})"
    else:
        field = re.fullmatch(r"(\w+): (.*)", problem, re.S)  # raised by a __post_init__ check
        if field:
            path, problem = f"{path}.{field[1]}" if path else field[1], field[2]
        what = problem[:1].lower() + problem[1:]
        todo = ""
        choices = _choices(_type_at(path)) if problem.startswith("Invalid enum value") else []
        if choices:
            todo = f"use one of {', '.join(repr(c) for c in choices)}"
    src = _origin(path, origins, default_src)
    todo = todo or ("fix or unset that variable" if src.startswith("environment") else "fix the value")
    return ConfigError(f"invalid config in {src}: `{path or '<top level>'}`: {what}; {todo}")


def _origin(path: str, origins: _Origins, default_src: str) -> str:
    parts = re.sub(r"\[\d+\]", "", path).split(".")
    for n in range(len(parts), 0, -1):  # longest known prefix: a list item comes from where its list was set
        src = origins.get(".".join(parts[:n]))
        if src is not None:
            return src
    return default_src


def _choices(tp: Any) -> list[Any]:
    """The values a Literal field (maybe Optional or Annotated) accepts."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if origin in (Annotated, Union, types.UnionType):
        return [c for arg in typing.get_args(tp) for c in _choices(arg)]
    return []


def _type_at(path: str) -> Any:
    tp: Any = Config
    for part in filter(None, path.split(".")):
        tp = _fields(tp).get(part)
    return tp
