"""Loading: choose the file (best, latest, a path; older ones on fallback), decompress and verify it
straight into the model's and optimizer's tensors where they fit, then apply the state."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flightlog.checkpoint.state import DTYPES_BY_NAME, check_rng_state, collect_state, decode_value, set_rng_state
from flightlog.proto.checkpoint.format import DTYPE_SIZES, decode_stored_meta
from flightlog.proto.checkpoint.reader import CheckpointReader
from flightlog.proto.checkpoint.registry import Registry
from flightlog.proto.errors import CheckpointError

__all__ = ["candidates", "in_place_targets", "read_state", "apply_state"]


def candidates(reg: Registry | None, directory: Path, target: str, fallback: bool, run_id: str
               ) -> list[tuple[str, str | None]]:
    """(path, registered checksum) to try in order: the target ("best" or "latest" of run ``run_id``, or a
    path), then (fallback) older ones of the same run: the run that registered the path, else ``run_id``."""
    rows: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    others: list[str] = []
    if reg is not None:
        with reg:
            if target not in ("best", "latest"):
                chosen = reg.get(str(Path(target).absolute()))
            owner = run_id if chosen is None else chosen["run_id"] or ""
            rows = reg.entries(str(directory), run_id=owner)[::-1]  # newest first
            if not rows:
                others = reg.runs(str(directory))
    if target == "latest":
        chosen = rows[0] if rows else None
    elif target == "best":
        chosen = next((r for r in rows if r["is_best"]), None)
    if target in ("best", "latest") and chosen is None:
        raise CheckpointError(f"no {target} checkpoint of run {run_id!r} registered for {directory}"
                              + _other_runs(others))
    if chosen is None or chosen["state"] != "done":
        first: tuple[str, str | None] = (str(Path(target).absolute()), None)
        return [first] + ([(r["path"], r["checksum"]) for r in rows if r["path"] != first[0]] if fallback else [])
    out: list[tuple[str, str | None]] = [(chosen["path"], chosen["checksum"])]
    if fallback:
        out += [(r["path"], r["checksum"]) for r in rows
                if r["path"] != chosen["path"] and (target == "best" or r["seq"] < chosen["seq"])]
    return out


def _other_runs(runs: list[str]) -> str:
    """The hint for a run with no checkpoints in a directory that holds other runs' ones."""
    if not runs:
        return ""
    shown = ", ".join(repr(r) for r in runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
    return (f"; it holds checkpoints of run(s) {shown} (newest first): pass run_id= to load one of theirs, "
            "or create the tracker/ModelCheckpointer with run_id= to continue that run")


def in_place_targets(model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> dict[str, torch.Tensor]:
    """The tensors the objects being loaded into already hold, under the names a save gives them."""
    try:
        tensors, _ = collect_state(model, optimizer, scheduler, scaler)
    except (CheckpointError, RuntimeError, TypeError, AttributeError):
        return {}  # something odd about the targets: load everything into fresh memory instead
    return tensors


def read_state(reader: CheckpointReader, map_location: Any, into: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Decompress and verify the checkpoint. Tensors whose target (``into``: a model parameter, existing
    optimizer state) has the same dtype and shape are loaded straight into it, each piece only after its
    frame's checksum passed; the rest go to fresh memory. The file's checksum runs alongside and is
    checked before anything is applied. Everything that could fail later (a malformed state, an RNG
    state that cannot be restored, a dangling alias) is CheckpointCorrupt here, so a fallback can move on."""
    meta = decode_stored_meta(reader.metadata.get("flightlog"), reader.name, reader.tensors)
    in_place: dict[str, torch.Tensor] = {}
    for info in reader.tensors.values():
        t = into.get(info.name)
        if (t is not None and t.device.type == "cpu" and t.dtype == DTYPES_BY_NAME[info.dtype]
                and tuple(t.shape) == info.shape and t.is_contiguous() and t.numel()):
            in_place[info.name] = t
    data = reader.read_data(verify=True, in_place={k: t.data_ptr() for k, t in in_place.items()})
    base = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for info in reader.tensors.values():
        dtype = DTYPES_BY_NAME[info.dtype]
        if info.name in in_place:
            t = in_place[info.name]
        elif info.end == info.begin:
            t = torch.empty(info.shape, dtype=dtype)
        else:
            raw = base[info.begin:info.end]
            if info.begin % DTYPE_SIZES[info.dtype]:
                raw = raw.clone()
            t = raw.view(dtype).view(info.shape)
        tensors[info.name] = t if map_location in (None, "cpu") else t.to(map_location)
    for alias, target in meta.get("aliases", {}).items():
        tensors[alias] = tensors[target]
    # model_extra maps the model's own keys (never a stored form) to values
    meta["model_extra"] = {k: decode_value(v, tensors, reader.name) for k, v in meta.get("model_extra", {}).items()}
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        if meta.get(key) is not None:
            meta[key] = decode_value(meta[key], tensors, reader.name)
    check_rng_state(meta.get("rng", {}), reader.name)
    meta["_tensors"] = tensors
    return dict(meta)


def apply_state(state: dict[str, Any], model: Any, optimizer: Any, scheduler: Any, scaler: Any, strict: bool,
           restore_rng: bool) -> tuple[int, int]:
    tensors = state["_tensors"]
    if model is not None:
        sd: dict[str, Any] = {k: v for k, v in tensors.items() if not k.startswith("@")}
        sd.update(state.get("model_extra") or {})
        model.load_state_dict(sd, strict=strict)
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if state.get(key) is None:
            raise CheckpointError(f"the checkpoint holds no {key} state, but a {key} was given to load into")
        obj.load_state_dict(state[key])
    if restore_rng and state.get("rng"):
        set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["step"])

