"""Visualisation helpers computed in the training process: per-layer gradient norms (and a gradient-flow
plot), weight/gradient histograms, a model summary, and data-distribution histograms of a batch.

torch, numpy and matplotlib are imported inside the functions that need them, never at import time.
"""
from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HistogramData",
    "gradient_norms",
    "gradient_flow_png",
    "parameter_histograms",
    "histogram",
    "model_summary",
    "data_distribution",
    "histogram_events",
    "gradient_flow_events",
    "data_distribution_events",
    "model_summary_events",
    "cuda_memory_stats",
]

DEFAULT_BINS = 64


@dataclass
class HistogramData:
    """TensorBoard's histogram layout: ``counts[i]`` values in (limits[i-1], limits[i]]."""

    bucket_limits: list[float]
    bucket_counts: list[float]
    min: float = 0.0
    max: float = 0.0
    count: float = 0.0
    sum: float = 0.0
    sum_squares: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _torch() -> Any:
    import torch

    return torch


def histogram(values: Any, bins: int = DEFAULT_BINS) -> HistogramData | None:
    """Histogram of a tensor or array (any shape, any device); non-finite values are left out.

    Counted where the tensor lives (GPU included): only ``bins`` numbers come back to the CPU.
    None when nothing finite is in it.
    """
    torch = _torch()
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    t = t.detach().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    is_int = not (t.is_floating_point() or t.is_complex())
    t = t.double() if t.device.type == "cpu" else t.float()
    t = t[torch.isfinite(t)]
    n = t.numel()
    if n == 0:
        return None
    lo, hi = float(t.min()), float(t.max())
    if is_int and hi - lo + 1 <= bins:
        # Integer data (labels, token ids) with few values: one bucket per value, edges between them.
        bins = int(hi - lo + 1)
        lo, hi = lo - 0.5, hi + 0.5
    elif hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(t, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    limits = [lo + width * (i + 1) for i in range(bins)]
    s = float(t.sum())
    sq = float((t * t).sum())
    return HistogramData(
        bucket_limits=limits, bucket_counts=[float(c) for c in counts.tolist()],
        min=float(t.min()), max=float(t.max()), count=float(n), sum=s, sum_squares=sq,
        extra={"mean": s / n, "std": math.sqrt(max(0.0, sq / n - (s / n) ** 2))},
    )


def gradient_norms(model: Any) -> dict[str, float]:
    """``grad_norm/<parameter>`` → L2 norm of its gradient, plus ``grad_norm/total``; parameters without a
    gradient (frozen, unused) are left out. One device-to-host copy for all the norms."""
    torch = _torch()
    names, norms = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            names.append(name)
            norms.append(p.grad.detach().float().norm(2))
    if not norms:
        return {}
    stacked = torch.stack(norms)
    values = stacked.cpu().tolist()
    out = {f"grad_norm/{n}": float(v) for n, v in zip(names, values)}
    out["grad_norm/total"] = float(stacked.norm(2).cpu())
    return out


def _layer_grad_stats(model: Any) -> tuple[list[str], list[float], list[float]]:
    torch = _torch()
    names, means, maxes = [], [], []
    for name, p in model.named_parameters():
        if p.grad is not None and p.requires_grad and not name.endswith("bias"):
            g = p.grad.detach().float().abs()
            names.append(name)
            means.append(g.mean())
            maxes.append(g.max())
    if not names:
        return [], [], []
    return names, torch.stack(means).cpu().tolist(), torch.stack(maxes).cpu().tolist()


def gradient_flow_png(model: Any, *, width_px: int = 1000, height_px: int = 600, dpi: int = 100) -> bytes | None:
    """A bar chart of mean and max |gradient| per layer (weights, not biases), as PNG bytes."""
    names, means, maxes = _layer_grad_stats(model)
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar(xs, maxes, alpha=0.4, color="tab:cyan", label="max |grad|")
    ax.bar(xs, means, alpha=0.8, color="tab:blue", label="mean |grad|")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=75, fontsize=6)
    ax.set_yscale("log" if any(v > 0 for v in means) else "linear")  # gradients span decades
    ax.set_xlabel("layer")
    ax.set_ylabel("|gradient|")
    ax.set_title("gradient flow")
    ax.legend(loc="upper right")
    fig.subplots_adjust(bottom=0.35)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def parameter_histograms(model: Any, *, bins: int = DEFAULT_BINS, gradients: bool = True) -> Iterator[
        tuple[str, HistogramData]]:
    """``weights/<name>`` for every parameter and ``gradients/<name>`` for those with a gradient."""
    for name, p in model.named_parameters():
        h = histogram(p, bins)
        if h is not None:
            yield f"weights/{name}", h
        if gradients and p.grad is not None:
            g = histogram(p.grad, bins)
            if g is not None:
                yield f"gradients/{name}", g


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def model_summary(model: Any) -> tuple[str, dict[str, int]]:
    """(text, counts): a table of the leaf modules (name, type, parameters, trainable) with totals."""
    rows = [("layer", "type", "params", "trainable", "shape")]
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if any(True for _ in mod.children()) and name:
            continue  # containers: their leaves are listed
        own = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if id(p) not in seen]
        if not own and name:
            rows.append((name, type(mod).__name__, "0", "0", ""))
            continue
        for _, p in own:
            seen.add(id(p))
        n = sum(p.numel() for _, p in own)
        t = sum(p.numel() for _, p in own if p.requires_grad)
        shape = ", ".join("x".join(str(d) for d in p.shape) for _, p in own)
        rows.append((name or "(root)", type(mod).__name__, f"{n:,}", f"{t:,}", shape))
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [type(model).__name__]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) if j < 4 else c for j, (c, w) in
                               enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    lines.append(f"total parameters: {total:,} ({_human(total)}), trainable: {trainable:,} "
                 f"({_human(trainable)}), non-trainable: {total - trainable:,}")
    lines.append(f"size of parameters and buffers: {nbytes / 2**20:.2f} MiB")
    return "\n".join(lines), {"parameters": total, "trainable_parameters": trainable, "size_bytes": nbytes}


def _leaves(batch: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(batch, Mapping):
        for k, v in batch.items():
            yield from _leaves(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            yield from _leaves(v, f"{prefix}/{i}" if prefix else str(i))
    elif hasattr(batch, "shape") and hasattr(batch, "dtype"):
        yield prefix or "batch", batch


def data_distribution(batch: Any, *, bins: int = DEFAULT_BINS) -> list[tuple[str, HistogramData]]:
    """``data/<name>`` histograms of every tensor or array in a batch (a tensor, or dicts/lists/tuples of
    them); each histogram's ``extra`` holds mean and std."""
    out = []
    for name, value in _leaves(batch, ""):
        h = histogram(value, bins)
        if h is not None:
            out.append((f"data/{name}", h))
    return out


# --- events for the tracker (its log_* helpers emit these) ----------------------------------------------


def histogram_events(run_id: str, hists: Iterable[tuple[str, HistogramData]], step: int) -> list[Any]:
    from flightlog.proto.events import Histogram

    return [Histogram(run_id, key, step, time.time(), h.bucket_limits, h.bucket_counts, h.min, h.max, h.count,
                      h.sum, h.sum_squares) for key, h in hists]


def gradient_flow_events(run_id: str, model: Any, step: int, plot: bool) -> tuple[dict[str, float], list[Any]]:
    """``grad_norm/<param>`` metrics and (``plot``) the ``gradient_flow`` image."""
    from flightlog.proto.events import Image, Metrics

    norms = gradient_norms(model)
    events: list[Any] = [Metrics(run_id, step, time.time(), norms)] if norms else []
    png = gradient_flow_png(model) if plot else None
    if png is not None:
        events.append(Image(run_id, "gradient_flow", step, time.time(), "", png))
    return norms, events


def data_distribution_events(run_id: str, batch: Any, step: int, bins: int) -> tuple[int, list[Any]]:
    """``data/<name>/mean`` and ``/std`` metrics and ``data/<name>`` histograms; and how many histograms."""
    from flightlog.proto.events import Metrics

    hists = data_distribution(batch, bins=bins)
    stats = {f"{key}/{k}": v for key, h in hists for k, v in h.extra.items()}
    events: list[Any] = [Metrics(run_id, step, time.time(), stats)] if stats else []
    return len(hists), events + histogram_events(run_id, hists, step)


def model_summary_events(run_id: str, model: Any, step: int) -> tuple[str, list[Any]]:
    from flightlog.proto.events import HyperParams, Text

    text, counts = model_summary(model)
    return text, [Text(run_id, "model/summary", text, step, time.time()),
                  HyperParams(run_id, {f"model/{k}": v for k, v in counts.items()}, time.time())]


def cuda_memory_stats() -> dict[str, float]:
    """CUDA memory of this process per device, as ``memory/cuda:<i>/...`` values; {} when torch is not
    loaded or has no GPU (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    out: dict[str, float] = {}
    for i in range(torch.cuda.device_count()):
        p = f"memory/cuda:{i}/"
        out[p + "allocated_bytes"] = float(torch.cuda.memory_allocated(i))
        out[p + "max_allocated_bytes"] = float(torch.cuda.max_memory_allocated(i))
        out[p + "reserved_bytes"] = float(torch.cuda.memory_reserved(i))
        out[p + "max_reserved_bytes"] = float(torch.cuda.max_memory_reserved(i))
    return out
