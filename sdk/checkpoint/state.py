"""The checkpoint's state codec, with no pickle: tensors go into the safetensors data under their names (or
``@path`` names for tensors inside optimizer/scheduler/scaler state), everything else into JSON."""
from __future__ import annotations

import functools
import random
import subprocess
from collections.abc import Mapping
from typing import Any

import torch

from flightlog.proto.checkpoint.format import DTYPE_SIZES
from flightlog.proto.errors import CheckpointCorrupt, CheckpointError

__all__ = ["FORMAT_TAG", "TORCH_DTYPES", "DTYPES_BY_NAME", "encode_value", "decode_value", "rng_state",
           "set_rng_state", "check_rng_state", "metric_value", "git_commit", "collect_state", "plan_layout"]

FORMAT_TAG = "flightlog-checkpoint/1"
TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
DTYPES_BY_NAME = {v: k for k, v in TORCH_DTYPES.items()}


def encode_value(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a state value; tensors are moved to ``tensors`` under ``@path`` names."""
    if isinstance(obj, torch.Tensor):
        name = "@" + path
        tensors[name] = obj
        return {"__tensor__": name}
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    for kind in (bool, int, float, str):  # subclasses (IntEnum, ...) are stored as their base type
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, list):
        return [encode_value(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_value(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        if all(type(k) is str and not k.startswith("__") for k in obj):
            return {k: encode_value(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[encode_value(k, f"{path}/key", tensors), encode_value(v, f"{path}/{k}", tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    mod = type(obj).__module__
    if mod == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
        if isinstance(obj, np.generic):
            return obj.item()
    raise CheckpointError(
        f"cannot store the value at {path!r} ({type(obj).__name__}) without pickle: only tensors, numbers, "
        "strings, lists, tuples and dicts are stored; convert it in your state_dict"
    )


def decode_value(obj: Any, tensors: Mapping[str, torch.Tensor], name: str = "checkpoint") -> Any:
    """The value :func:`encode_value` stored. The JSON comes from a file: anything that is not a form
    ``encode_value`` writes is CheckpointCorrupt naming the file ``name`` (the caller bounds the nesting)."""
    if isinstance(obj, list):
        return [decode_value(v, tensors, name) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        ref = obj["__tensor__"]
        if not isinstance(ref, str) or ref not in tensors:
            raise CheckpointCorrupt(f"{name}: the state refers to a tensor {ref!r} that the file does not hold")
        return tensors[ref]
    if "__tuple__" in obj:
        return tuple(decode_value(v, tensors, name) for v in _list_of(obj["__tuple__"], name, "__tuple__"))
    if "__dict__" in obj:
        out: dict[Any, Any] = {}
        for pair in _list_of(obj["__dict__"], name, "__dict__"):
            if not isinstance(pair, list) or len(pair) != 2:
                raise CheckpointCorrupt(f"{name}: a stored dict item is not a [key, value] pair")
            key, value = decode_value(pair[0], tensors, name), decode_value(pair[1], tensors, name)
            try:
                out[key] = value
            except TypeError as exc:  # a key decoded to a list or dict
                raise CheckpointCorrupt(f"{name}: a stored dict has an unhashable key") from exc
        return out
    if "__dtype__" in obj:
        dtype = getattr(torch, obj["__dtype__"], None) if isinstance(obj["__dtype__"], str) else None
        if not isinstance(dtype, torch.dtype):
            raise CheckpointCorrupt(f"{name}: {obj['__dtype__']!r} is not a torch dtype")
        return dtype
    if "__ndarray__" in obj:
        return _ndarray(obj, name)
    return {k: decode_value(v, tensors, name) for k, v in obj.items()}


def _list_of(value: Any, name: str, form: str) -> list[Any]:
    if not isinstance(value, list):
        raise CheckpointCorrupt(f"{name}: a stored {form} holds a {type(value).__name__}, not a list")
    return value


def _ndarray(obj: dict[str, Any], name: str) -> Any:
    import numpy as np

    try:
        dtype = np.dtype(obj["__ndarray__"])
        if dtype.kind not in "biufc":  # numbers only: an object dtype would turn the data into anything
            raise TypeError(f"dtype {dtype} is not numeric")
        return np.array(_list_of(obj.get("data"), name, "ndarray"), dtype=dtype).reshape(obj.get("shape"))
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointCorrupt(f"{name}: a stored numpy array is malformed: {exc}") from exc


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].clone())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.clone() for t in state["cuda"]])


def check_rng_state(state: Any, name: str) -> None:
    """Refuse an RNG state that :func:`set_rng_state` could not apply, by applying it to private
    generators (the global ones are left alone until the whole checkpoint has been read)."""
    if not isinstance(state, Mapping):
        raise CheckpointCorrupt(f"{name}: the stored RNG state is a {type(state).__name__}, not a mapping")
    try:
        if "python" in state:
            random.Random().setstate(state["python"])
        if "numpy" in state:
            import numpy as np

            np.random.RandomState().set_state(state["numpy"])
        if "torch" in state:
            if not isinstance(state["torch"], torch.Tensor):
                raise TypeError("the torch state is not a tensor")
            torch.Generator().set_state(state["torch"].clone())
        cuda = state.get("cuda")
        if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) for t in cuda)):
            raise TypeError("the cuda state is not a list of tensors")
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
        # each library reports a state of the wrong shape its own way; all mean the same here
        raise CheckpointCorrupt(f"{name}: the stored RNG state cannot be restored: {exc}") from exc


def metric_value(name: str, value: Any) -> float:
    if isinstance(value, bool) or not hasattr(value, "__float__") or isinstance(value, (str, bytes)):
        raise TypeError(f"checkpoint metric {name!r} must be a number, got {type(value).__name__}")
    return float(value)


@functools.lru_cache(maxsize=8)
def git_commit(cwd: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""



def collect_state(model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    if model is not None:
        sd = model if isinstance(model, Mapping) else model.state_dict()
        extra = {}
        for name, value in sd.items():
            if name.startswith("@"):
                raise CheckpointError(f"model state key {name!r}: names starting with '@' are reserved")
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                extra[name] = encode_value(value, f"model/{name}", tensors)
        meta["model_extra"] = extra
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            meta[key] = encode_value(obj.state_dict(), key, tensors)
    meta["rng"] = encode_value(rng_state(), "rng", tensors)
    return tensors, meta


def plan_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[list[Any]], list[torch.Tensor], dict[str, str], int]:
    """Deduplicate exact aliases (tied weights), order by element size (so every tensor is aligned),
    and lay the tensors out back to back: returns (manifest rows, tensors in row order, aliases, bytes)."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    unique: list[tuple[str, torch.Tensor, str]] = []
    for name, t in tensors.items():
        if t.layout != torch.strided:
            raise CheckpointError(f"tensor {name!r} has layout {t.layout}; only dense tensors are stored")
        dtype = TORCH_DTYPES.get(t.dtype)
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        if t.numel():
            key = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        unique.append((name, t, dtype))
    unique.sort(key=lambda u: (-DTYPE_SIZES[u[2]], u[0]))
    manifest, order, pos = [], [], 0
    for name, t, dtype in unique:
        n = t.numel() * DTYPE_SIZES[dtype]
        manifest.append([name, dtype, list(t.shape), pos, pos + n])
        order.append(t)
        pos += n
    return manifest, order, aliases, pos
