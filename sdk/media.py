"""Images a training script logs (``tracker.log_image``, ``tracker.log_figure``): numpy arrays, torch tensors,
PIL images and matplotlib figures encoded as PNG, the one image form every backend with images reads."""
from __future__ import annotations

import io
from typing import Any

__all__ = ["image_png", "figure_png"]

_CHANNELS = (1, 3, 4)


def image_png(image: Any) -> bytes:
    """PNG bytes of ``image``: a PIL image; or an array or tensor H×W (grey), H×W×C or C×H×W (C = 1, 3, 4),
    of floats in [0, 1] (clipped) or integers in [0, 255]."""
    try:
        from PIL import Image as PILImage
    except ImportError as exc:
        raise ImportError("log_image needs Pillow: pip install pillow (matplotlib brings it)") from exc
    if isinstance(image, PILImage.Image):
        return _encode(image)
    import numpy as np

    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor (on any device)
        image = image.detach().cpu()
        if getattr(image, "dtype", None) is not None and "bfloat16" in str(image.dtype):
            image = image.float()
        image = image.numpy()
    arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"log_image expects numbers (an array, tensor or PIL image), got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in _CHANNELS and arr.shape[-1] not in _CHANNELS:
        arr = np.moveaxis(arr, 0, -1)  # C×H×W (torch's layout) -> H×W×C
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in _CHANNELS) or 0 in arr.shape:
        raise ValueError(f"log_image expects H×W, H×W×C or C×H×W with C in 1, 3, 4; got shape {arr.shape}")
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    mode = {2: "L"}.get(arr.ndim) or {3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return _encode(PILImage.fromarray(np.ascontiguousarray(arr), mode=mode))


def figure_png(fig: Any, dpi: int | None = None) -> bytes:
    """PNG bytes of a matplotlib figure (drawn with its own canvas: no pyplot state, no window)."""
    if not hasattr(fig, "savefig"):
        raise TypeError(f"log_figure expects a matplotlib Figure, got {type(fig).__name__}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _encode(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
