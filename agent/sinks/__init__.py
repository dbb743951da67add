"""flightlog.agent.sinks: where delivered events go. One module per backend; the backend libraries
(tensorboardX, mlflow, wandb) are imported only when a run first needs them, so importing this package
stays cheap."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Ack, Batch, Sink, SinkCursor

if TYPE_CHECKING:
    from .mlflow_sink import MLflowTracker
    from .tensorboard_sink import TensorBoardTracker
    from .wandb_sink import WandBTracker

__all__ = ["Ack", "Batch", "Sink", "SinkCursor", "TensorBoardTracker", "MLflowTracker", "WandBTracker",
           "backend_sinks"]

_LAZY = {
    "TensorBoardTracker": ".tensorboard_sink",
    "MLflowTracker": ".mlflow_sink",
    "WandBTracker": ".wandb_sink",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def backend_sinks(settings: dict[str, Any], data_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """One TensorBoard, MLflow, W&B and webhook sink for the agent; each serves the runs whose RunStart names it.
    With ``notify.webhook_url`` in the agent's own config, also the node's webhook sink, serving every run.

    ``settings`` is the agent's config dict: its ``tracking`` section (if any) gives defaults under each
    run's own. The sinks' state lives in ``<data_dir>/sinks`` (default: the data dir that
    ``flightlog.proto.paths.resolve_paths`` finds from the environment and ``settings["agent"]``).
    """
    if data_dir is None:
        from flightlog.proto.paths import resolve_paths

        agent = settings.get("agent") or {}
        data_dir = resolve_paths(agent.get("data_dir"), agent.get("socket")).data_dir
    state_dir = Path(data_dir) / "sinks"
    defaults = dict(settings.get("tracking") or {})
    from .mlflow_sink import MLflowTracker
    from .tensorboard_sink import TensorBoardTracker
    from .wandb_sink import WandBTracker
    from .webhook_sink import WebhookSink

    sinks: list[Any] = [cls(state_dir, defaults=defaults) for cls in (TensorBoardTracker, MLflowTracker, WandBTracker)]
    got = settings.get("notify")
    notify: dict[str, Any] = got if isinstance(got, dict) else {}
    url = notify.get("webhook_url")
    node_url = url if isinstance(url, str) and url else None  # the agent's own: the node's, for every run
    sinks.append(WebhookSink(state_dir, notify=notify, node_url=node_url))
    if node_url:
        from .webhook_sink import NodeWebhookSink

        sinks.append(NodeWebhookSink(state_dir, url=node_url, notify=notify))
    return sinks
