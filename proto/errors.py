"""The one exception tree of flightlog, shared by the SDK and the agent."""
from __future__ import annotations

__all__ = [
    "FlightlogError",
    "ConfigError",
    "ProtocolError",
    "RingError",
    "EventTooLarge",
    "AgentUnavailable",
    "AgentLocked",
    "WALError",
    "WALCorrupt",
    "StoreCorrupt",
    "BackendError",
    "RetryableBackendError",
    "PermanentBackendError",
    "CheckpointError",
    "CheckpointCorrupt",
    "CheckpointIncomplete",
    "CheckpointKeyError",
    "TrackerFinished",
    "AuditError",
    "AuditCorrupt",
    "AccessDenied",
    "SecretError",
]


class FlightlogError(Exception):
    """Base class of every error flightlog raises on purpose."""


class ConfigError(FlightlogError, ValueError):
    """A configuration file, dict or override is malformed; the message names the key and the file."""


class ProtocolError(FlightlogError):
    """A frame or message could not be decoded (malformed, truncated or of another schema version)."""


class RingError(FlightlogError):
    """A shared-memory ring could not be created, opened or written."""


class EventTooLarge(FlightlogError, ValueError):
    """An event encodes to more bytes than one event may carry (``flightlog.proto.frames.MAX_EVENT_BYTES``);
    refused at the call, before any of it is written."""


class AgentUnavailable(FlightlogError):
    """The agent could not be reached or started."""


class AgentLocked(FlightlogError):
    """Another agent already owns this data directory (its process exits with ``AGENT_LOCKED_EXIT``)."""


class WALError(FlightlogError):
    """The write-ahead log could not be read or written."""


class WALCorrupt(WALError):
    """A WAL segment holds bytes that are not a valid record."""


class StoreCorrupt(FlightlogError):
    """The local store holds bytes that are not what it wrote (a metric chunk that does not decode)."""


class BackendError(FlightlogError):
    """A tracking backend refused or failed a request."""


class RetryableBackendError(BackendError):
    """A backend failure worth retrying (network, 5xx, 429); may carry a Retry-After delay in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentBackendError(BackendError):
    """A backend failure that no retry will fix (bad request, bad credentials)."""


class CheckpointError(FlightlogError):
    """A checkpoint could not be staged, written or loaded."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file failed its checksum or bounds checks."""


class CheckpointIncomplete(CheckpointError):
    """A distributed checkpoint has no committed metadata: its save did not finish (or it is no checkpoint)."""


class CheckpointKeyError(CheckpointError):
    """An encrypted checkpoint cannot be sealed or opened: no key with its key id, the wrong key under that
    id, or a key provider (variable, file, command) that failed. The message names the key id; the file's
    bytes are never guessed at."""


class TrackerFinished(FlightlogError, RuntimeError):
    """A tracker method was called after ``finish()``: the run's ring and connection are released."""


class AuditError(FlightlogError):
    """The audit log (``<data dir>/audit.log``), its key or its seal cannot be used."""


class AuditCorrupt(AuditError):
    """An audit entry is not one, or the chain or seal does not hold: the log was edited, cut or reordered."""


class AccessDenied(FlightlogError, PermissionError):
    """This user may not read that run or checkpoint (its owner, members of ``access.group`` and root may)."""


class SecretError(ConfigError):
    """A secret (``${secret:NAME}``) is missing or the secret store cannot be used."""
