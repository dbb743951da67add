"""Lightning with flightlog next to Lightning's own loggers and checkpoint plugins, in the same run.

1. Seconds per training step of a small model (2,000 steps per logger, in 4 interleaved rounds; ``--quick``:
   200) with ``FlightlogLogger``,
   ``TensorBoardLogger``, ``MLFlowLogger`` (a local sqlite store), ``WandbLogger(offline=True)`` and no logger,
   every step logging two values (``log_every_n_steps=1``).
2. Time the training loop is blocked per checkpoint (a ModelCheckpoint every N steps) with
   ``FlightlogCheckpointIO``, the default ``TorchCheckpointIO`` and ``AsyncCheckpointIO``.

Prints one JSON object (ratios to the no-logger / TorchCheckpointIO rows). Starts its own agent in a
temporary data directory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")
ROUNDS = 4  # the logger comparison: each logger's steps in this many interleaved fits
os.environ.setdefault("WANDB_SILENT", "true")


def _module(width: int) -> Any:
    import lightning as L

    class Small(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                           torch.nn.ReLU(), torch.nn.Linear(width, 1))

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            self.log("lr", 0.01)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    return Small()


def _data(steps: int) -> Any:
    x = torch.randn(steps * 8, 32)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=8)


class _StepTimer:
    """Wall time per training step, measured from batch start to batch end (the loop as the user sees it)."""

    def __init__(self) -> None:
        import lightning as L

        outer = self

        class CB(L.Callback):
            def on_train_batch_start(self, *a: Any) -> None:
                outer.t0 = time.perf_counter()

            def on_train_batch_end(self, *a: Any) -> None:
                outer.times.append(time.perf_counter() - outer.t0)

        self.times: list[float] = []
        self.t0 = 0.0
        self.callback = CB()


def _fit(logger: Any, steps: int, plugins: list[Any] | None = None, callbacks: list[Any] | None = None,
         width: int = 64) -> tuple[float, Any]:
    import lightning as L

    timer = _StepTimer()
    trainer = L.Trainer(max_epochs=1, max_steps=steps, logger=logger, plugins=plugins or None,
                        callbacks=[timer.callback, *(callbacks or [])], enable_checkpointing=bool(callbacks),
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        log_every_n_steps=1)
    start = time.perf_counter()
    trainer.fit(_module(width), _data(steps))
    total = time.perf_counter() - start
    times = sorted(timer.times[10:])  # the first steps warm up
    return total, {"seconds_per_step": sum(times) / max(len(times), 1), "p50": times[len(times) // 2],
                   "p99": times[int(len(times) * 0.99)], "fit_seconds": total}


def bench_loggers(steps: int, root: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    from flightlog.integrations.lightning import FlightlogLogger, reset_active

    per: dict[str, list[dict[str, Any]]] = {}
    makers = {
        "none": lambda: False,
        "flightlog": lambda: FlightlogLogger("bench", cfg),
        "tensorboard": lambda: TensorBoardLogger(str(root / "tb-peer")),
        "mlflow": lambda: MLFlowLogger("bench", tracking_uri=f"sqlite:///{root}/peer-mlflow.db"),
        "wandb_offline": lambda: WandbLogger(project="bench", offline=True, save_dir=str(root / "wandb")),
    }
    # Interleaved rounds, the order rotated each round: a shared machine's load drifts over minutes, and
    # one long fit per logger would measure the drift rather than the loggers.
    names = list(makers)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _total, row = _fit(makers[name](), max(steps // ROUNDS, 20))
            per.setdefault(name, []).append(row)
            if name == "wandb_offline":
                import wandb

                wandb.finish()
            reset_active()
    rows = {name: {"seconds_per_step": sum(r["seconds_per_step"] for r in got) / len(got),
                   "p50": sorted(r["p50"] for r in got)[len(got) // 2], "p99": max(r["p99"] for r in got),
                   "fit_seconds": sum(r["fit_seconds"] for r in got)} for name, got in per.items()}
    base = rows["none"]["seconds_per_step"]
    for row in rows.values():
        row["vs_no_logger"] = row["seconds_per_step"] / base
    return rows


def bench_checkpoints(steps: int, every: int, width: int, root: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    from flightlog.integrations.lightning import FlightlogCheckpointIO, FlightlogLogger, reset_active

    rows: dict[str, Any] = {}
    for name in ("torch", "async", "flightlog"):
        blocked: list[float] = []
        if name == "torch":
            io: Any = TorchCheckpointIO()
        elif name == "async":
            io = AsyncCheckpointIO(TorchCheckpointIO())
        else:
            io = FlightlogCheckpointIO()
        original = io.save_checkpoint

        def timed(*a: Any, _orig: Any = original, _out: list[float] = blocked, **k: Any) -> None:
            t0 = time.perf_counter()
            _orig(*a, **k)
            _out.append(time.perf_counter() - t0)

        io.save_checkpoint = timed
        logger = FlightlogLogger("bench-ckpt", cfg) if name == "flightlog" else False
        ck = ModelCheckpoint(dirpath=str(root / f"ckpt-{name}"), every_n_train_steps=every, save_top_k=-1)
        total, row = _fit(logger, steps, plugins=[io], callbacks=[ck], width=width)
        reset_active()
        nbytes = sum(p.numel() * 4 for p in _module(width).parameters()) * 3  # weights + Adam's two moments
        rows[name] = {"checkpoints": len(blocked), "blocked_mean_s": sum(blocked) / max(len(blocked), 1),
                      "blocked_max_s": max(blocked, default=0.0), "state_mb": nbytes / 2**20,
                      "fit_seconds": total}
    base = rows["torch"]["blocked_mean_s"]
    for row in rows.values():
        row["blocked_vs_torch"] = row["blocked_mean_s"] / base if base else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a small smoke size")
    args = ap.parse_args()
    steps = 200 if args.quick else 2000
    width = 256 if args.quick else 2048  # the checkpoint model: 2048 wide holds 4.3 M parameters (~49 MB with Adam)
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        root = Path(tmp)
        data, sock = root / "data", root / "a.sock"
        data.mkdir(mode=0o700)
        os.environ.update(FLIGHTLOG_DATA_DIR=str(data), FLIGHTLOG_AGENT_SOCKET=str(sock))
        agent = subprocess.Popen([sys.executable, "-m", "flightlog.agent", "--data-dir", str(data),
                                  "--socket", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            cfg = {"tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(root / "tb"),
                                "use_mlflow": True, "mlflow_tracking_uri": f"sqlite:///{root}/mlflow.db"},
                   "checkpointing": {"checkpoint_dir": str(root / "ckpt")}, "agent": {"autostart": False}}
            out = {"steps": steps, "loggers": bench_loggers(steps, root, cfg),
                   "checkpoint": bench_checkpoints(max(steps // 4, 40), max(steps // 40, 5), width, root, cfg)}
        finally:
            agent.terminate()
            agent.wait(60)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
