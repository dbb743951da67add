"""Wire types: every event a producer writes into its ring, and every control message.

Structs are tagged and array-like (compact, fast); new fields are only ever appended, with defaults,
so an older agent can read a newer SDK's events and the other way round.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

__all__ = [
    "HealthRequest",
    "SCHEMA_VERSION",
    "CRASHED",
    "END_STATUSES",
    "RunStart",
    "RunEnd",
    "HyperParams",
    "Metrics",
    "Tags",
    "Text",
    "SystemStats",
    "CheckpointSaved",
    "Artifact",
    "Histogram",
    "Image",
    "Alert",
    "Event",
    "EVENT_TYPES",
    "Hello",
    "Register",
    "Unregister",
    "FlushRequest",
    "EventBatch",
    "StatusRequest",
    "CheckpointSpec",
    "RetentionSpec",
    "TensorRow",
    "CheckpointRequest",
    "CheckpointWait",
    "Reply",
    "RunExportRequest",
    "Control",
]

#: Version of the event schema; written in every ring header and WAL segment header.
SCHEMA_VERSION = 1



class RunStart(msgspec.Struct, tag="rs", array_like=True):
    run_id: str
    name: str
    timestamp: float
    description: str = ""
    tags: list[str] = []
    config: dict[str, Any] = {}
    config_hash: str = ""
    sinks: list[str] = []
    pid: int = 0
    rank: int = 0
    host: str = ""
    metadata: dict[str, Any] = {}
    world_size: int = 1  # > 1: one rank of a distributed job; its run ends when every rank ended
    node: str = ""  # the node's name (FLIGHTLOG_NODE or the host name: flightlog.proto.names.node_name)
    node_rank: int = 0  # the launcher's node index (torchrun's GROUP_RANK, SLURM_NODEID); rank 0 is on node 0
    nodes: int = 1  # the job's nodes (> 1: each node's agent sees only its ranks' ends)
    local_world_size: int = 0  # ranks on this node (0: world_size // nodes)


#: A run's end status set by the agent, not the SDK: its producer died without finish() (SIGKILL, SIGTERM,
#: the OOM killer) and every event it logged is ingested (``flightlog.agent.ingest``).
CRASHED = "crashed"
#: The statuses a RunEnd carries: the SDK's finish() sends the first three, the agent CRASHED.
END_STATUSES = ("completed", "failed", "killed", CRASHED)


class RunEnd(msgspec.Struct, tag="re", array_like=True):
    run_id: str
    status: str  # one of END_STATUSES
    timestamp: float
    error: str = ""
    dropped: int = 0
    rank: int = 0  # whose end it is (of a distributed run: one rank's end, combined by the sinks)


class HyperParams(msgspec.Struct, tag="hp", array_like=True):
    run_id: str
    params: dict[str, Any]
    timestamp: float = 0.0
    #: The run's config hash now that these are logged too (it covers the config and every logged value);
    #: "" from an older SDK: the hash stays as RunStart gave it.
    config_hash: str = ""


class Metrics(msgspec.Struct, tag="m", array_like=True):
    run_id: str
    step: int
    timestamp: float
    values: dict[str, float]
    rank: int = 0


class Tags(msgspec.Struct, tag="tg", array_like=True):
    run_id: str
    tags: dict[str, str]
    timestamp: float = 0.0


class Text(msgspec.Struct, tag="tx", array_like=True):
    run_id: str
    key: str
    text: str
    step: int = 0
    timestamp: float = 0.0


class SystemStats(msgspec.Struct, tag="ss", array_like=True):
    run_id: str
    timestamp: float
    values: dict[str, float]
    step: int = 0


class CheckpointSaved(msgspec.Struct, tag="ck", array_like=True):
    run_id: str
    path: str
    epoch: int
    step: int
    timestamp: float
    metrics: dict[str, float] = {}
    size: int = 0
    checksum: str = ""
    is_best: bool = False


class Artifact(msgspec.Struct, tag="ar", array_like=True):
    run_id: str
    name: str
    path: str
    timestamp: float
    kind: str = ""
    checksum: str = ""
    size: int = 0


class Histogram(msgspec.Struct, tag="hi", array_like=True):
    """A distribution at a step (weights, gradients, a data batch): ``bucket_counts[i]`` values fell at or
    below ``bucket_limits[i]`` and above the previous limit (TensorBoard's layout)."""

    run_id: str
    key: str
    step: int
    timestamp: float
    bucket_limits: list[float]
    bucket_counts: list[float]
    min: float = 0.0
    max: float = 0.0
    count: float = 0.0
    sum: float = 0.0
    sum_squares: float = 0.0


class Image(msgspec.Struct, tag="im", array_like=True):
    """A PNG (a plot): its bytes in ``data``, and where it lies on the node that made it, if anywhere."""

    run_id: str
    key: str
    step: int
    timestamp: float
    path: str = ""
    data: bytes = b""
    caption: str = ""


class Alert(msgspec.Struct, tag="al", array_like=True):
    """Something a person should act on (disk almost full); ``level`` is "info", "warning" or "error"."""

    run_id: str
    level: str
    message: str
    timestamp: float
    key: str = ""


Event = Union[
    RunStart, RunEnd, HyperParams, Metrics, Tags, Text, SystemStats, CheckpointSaved, Artifact, Histogram, Image,
    Alert,
]
EVENT_TYPES: tuple[type, ...] = (
    RunStart, RunEnd, HyperParams, Metrics, Tags, Text, SystemStats, CheckpointSaved, Artifact, Histogram, Image,
    Alert,
)


# --- control messages (Unix socket, request/reply) ---------------------------------------------


class Hello(msgspec.Struct, tag="hello", array_like=True):
    schema: int
    pid: int


class Register(msgspec.Struct, tag="reg", array_like=True):
    producer_id: str
    ring_path: str
    pid: int
    rank: int = 0
    run_id: str = ""


class Unregister(msgspec.Struct, tag="unreg", array_like=True):
    producer_id: str


class FlushRequest(msgspec.Struct, tag="flush", array_like=True):
    """Ask the agent to return once this producer's events up to the given positions are fsynced."""

    producer_id: str
    ring_position: int
    spill_gen: int = 0
    spill_position: int = 0
    timeout: float = 30.0


class EventBatch(msgspec.Struct, tag="events", array_like=True):
    """Frames sent over the socket by a producer that cannot use a ring (CPUs other than x86-64)."""

    producer_id: str
    frames: bytes
    count: int


class StatusRequest(msgspec.Struct, tag="status", array_like=True):
    pass


class HealthRequest(msgspec.Struct, tag="health", array_like=True):
    """How the sinks serve one run (``flightlog.agent.health``). A long poll: the agent answers once the
    report's ``version`` differs from ``version`` or after ``wait`` seconds; ``upto``: a WAL seq (a flush's
    ``next_seq``) that a sink must pass to count as delivered, -1: the WAL's end at the request."""

    run_id: str
    version: str = ""
    wait: float = 0.0
    after_seconds: float = 30.0
    upto: int = -1
    settle: bool = False  # answer once no sink of the run is still delivering (finish's summary), or at ``wait``


_NonNegative = Annotated[int, msgspec.Meta(ge=0)]

#: One tensor of a staged checkpoint: name, safetensors dtype, shape, and its [begin, end) bytes in the
#: staging buffer.
TensorRow = tuple[str, str, list[_NonNegative], _NonNegative, _NonNegative]


class RetentionSpec(msgspec.Struct, kw_only=True):
    """What the writer keeps after a checkpoint is durable (``flightlog.proto.checkpoint.retention``)."""

    max_checkpoints: _NonNegative = 10  # 0 keeps all
    keep_every_n_steps: _NonNegative = 0
    monitor: str | None = None  # the metric that picks the best checkpoint
    mode: Literal["min", "max"] = "min"


class CheckpointSpec(msgspec.Struct, kw_only=True):
    """A staged checkpoint to write: built by the SDK's checkpointer, decoded by the agent's checkpoint
    service (or handed to the in-process writer). Every key typed, every default here. Encoded as a map
    (not array_like): a spec of an older or newer SDK still decodes, unknown keys are ignored."""

    path: str  # the final, absolute path
    staging: str  # the shared-memory file holding the tensors' bytes
    data_bytes: _NonNegative
    tensors: list[TensorRow]
    metadata: dict[str, str]  # the safetensors __metadata__
    epoch: int
    step: int
    request_id: str = ""
    v: int = 1
    codec: str = "zstd"  # one of flightlog.proto.checkpoint.format.CODECS
    level: int = 1
    metrics: dict[str, float] = {}
    is_best: bool | None = None  # None: the retention's monitor decides
    dtypes: dict[str, _NonNegative] = {}  # safetensors dtype -> bytes
    retention: RetentionSpec = msgspec.field(default_factory=RetentionSpec)
    min_free_bytes: _NonNegative = 0
    run_id: str = ""
    config_hash: str = ""
    git_commit: str = ""
    created: float = 0.0
    upload: Literal["none", "best", "all"] = "none"
    encryption: str = "none"  # or "aes-256-gcm" (flightlog.proto.checkpoint.crypto): seal with key_id's key
    key_id: str = ""
    key: str = ""  # that key, base64: it crosses only the private control socket, and is never written anywhere
    group: str = ""  # access.group: the file and its folder are shared with this group (0640/0750)

    def __repr__(self) -> str:  # a logged spec must not show the key
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__struct_fields__ if k != "key")
        return f"CheckpointSpec({fields}, key=<redacted>)"

class CheckpointRequest(msgspec.Struct, tag="ckreq", array_like=True):
    """Ask the agent to write a staged checkpoint. ``spec`` is an encoded CheckpointSpec, decoded by the
    agent's checkpoint service so that a malformed one gets an error reply naming the key (build it with
    ``CheckpointRequest.of``)."""

    request_id: str
    spec: msgspec.Raw

    @classmethod
    def of(cls, spec: CheckpointSpec) -> CheckpointRequest:
        return cls(spec.request_id, msgspec.Raw(msgspec.msgpack.encode(spec)))


class CheckpointWait(msgspec.Struct, tag="ckwait", array_like=True):
    """Return when the checkpoint request is durable (reply data: path, size, checksum) or failed."""

    request_id: str
    timeout: float = 600.0


class RunExportRequest(msgspec.Struct, tag="runexp", array_like=True):
    """A run and its metric points (of ``key``, or all), read by the agent for a peer that may read it (its
    owner, ``access.group``, root) but not the store's files (a multi-user agent's)."""

    run: str
    key: str | None = None


class RunDeleteRequest(msgspec.Struct, tag="rundel", array_like=True):
    """Delete an ended run from the agent's store (``flightlog runs rm``), for its owner, ``access.group``, root."""

    run: str


class RunFilesRequest(msgspec.Struct, tag="runfiles", array_like=True):
    """Files of a run the agent opens for a peer that may read the run and hands over as file descriptors
    (SCM_RIGHTS, one byte each, right after the reply; ``data["names"]`` in their order): ``kind`` "plots"
    (its PNGs, rendered first if there are none) or "checkpoint" (``path``, a checkpoint registered to it)."""

    run: str
    kind: Literal["plots", "checkpoint"]
    path: str = ""


class Reply(msgspec.Struct, tag="reply", array_like=True):
    ok: bool
    error: str = ""
    data: dict[str, Any] = {}


Control = Union[
    Hello, Register, Unregister, FlushRequest, EventBatch, StatusRequest, CheckpointRequest, CheckpointWait, Reply,
    HealthRequest,
    RunExportRequest,
    RunDeleteRequest, RunFilesRequest,
]
