"""Lightning (issue 14, item 1): a real ``Trainer`` with ``FlightlogLogger``, ``FlightlogCheckpointIO`` and
``ModelCheckpoint(save_top_k=2, monitor="val_loss")`` on a tiny model: every logged value reaches MLflow (a real
server), TensorBoard (read by its own EventAccumulator) and the local store; ModelCheckpoint's top-k deletions
go through the plugin; a resume with ``ckpt_path=`` restores exactly what was saved."""
from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import AgentProcess
from conftest_backends import MlflowServer, approx_points, ended_mlflow_runs, mlflow_server, tb_scalars  # noqa: F401
from test_crashed import wait_status

from flightlog.agent.store import Store
from flightlog.proto.checkpoint.reader import CheckpointReader
from flightlog.proto.checkpoint.registry import Registry

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from flightlog.integrations import lightning as fl_lightning  # noqa: E402

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:.*(GPU available|TPU available|HPU available|LeafSpec).*"),
]


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(width, 1)

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), on_epoch=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)  # Adam: state to restore


def loaders() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    data = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(data, batch_size=8), torch.utils.data.DataLoader(data, batch_size=32))


class Recording(fl_lightning.FlightlogLogger):
    """FlightlogLogger that also keeps what Lightning handed it, to compare with what the backends got."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        for k, v in metrics.items():
            self.seen.setdefault(k, []).append((int(step or 0), float(v)))


def trainer(logger: Any, ckpt_dir: Path, epochs: int, **kwargs: Any) -> Any:
    return L.Trainer(max_epochs=epochs, logger=logger, plugins=[fl_lightning.FlightlogCheckpointIO()],
                     callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_top_k=2, monitor="val_loss"), *kwargs.pop("cbs", [])],
                     accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, val_check_interval=0.5, log_every_n_steps=1, **kwargs)


@pytest.fixture
def setup(agent: AgentProcess, mlflow_server: MlflowServer, tmp_path: Path) -> Iterator[dict[str, Any]]:  # noqa: F811
    fl_lightning.reset_active()
    config = {"tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(tmp_path / "tb"),
                           "use_mlflow": True, "mlflow_tracking_uri": mlflow_server.uri,
                           "mlflow_experiment_name": "lightning"},
              "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")}, "agent": {"autostart": False}}
    yield {"config": config, "agent": agent, "mlflow": mlflow_server, "tmp": tmp_path}
    fl_lightning.reset_active()


class Capture(L.Callback):
    """The state right after Lightning restored a checkpoint (before the first new step)."""

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.step, self.epoch = trainer.global_step, trainer.current_epoch
        self.weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.optim = copy.deepcopy(trainer.optimizers[0].state_dict())  # its tensors change in place


def test_trainer_logs_everywhere_keeps_top_k_and_resumes_exactly(setup: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    tmp, config = setup["tmp"], setup["config"]
    ckpt_dir = tmp / "lightning-ckpt"
    logger = Recording("lit-run", config)
    train, val = loaders()
    ck = trainer(logger, ckpt_dir, 2)
    ck.fit(Tiny(), train, val)
    run_id = logger.version
    callback = ck.checkpoint_callback

    # top-k on top of the plugin: 4 validations saved, 2 kept; the other two deleted and marked so
    kept = sorted(str(Path(p)) for p in callback.best_k_models)
    assert len(kept) == 2
    assert sorted(str(p) for p in ckpt_dir.glob("*.ckpt")) == kept
    with Registry(setup["agent"].paths.store) as reg:
        rows = {r["path"]: r["state"] for r in reg.entries(str(ckpt_dir), ("done", "deleted"), run_id=run_id)}
        best_row = reg.best(str(ckpt_dir), run_id=run_id)
    assert sorted(p for p, s in rows.items() if s == "done") == kept
    assert sum(s == "deleted" for s in rows.values()) == 2
    assert best_row is not None and best_row["path"] == str(Path(callback.best_model_path))
    for p in kept:  # flightlog's own format, checksum verified, no pickle
        with CheckpointReader(p, verify=True) as r:
            assert any("state_dict" in name for name in r.tensors)

    # every value Lightning handed the logger, in the store, TensorBoard and MLflow
    wait_status(setup["agent"].paths, run_id, "completed")
    seen = {k: v for k, v in logger.seen.items() if k in ("train_loss", "val_loss", "epoch")}
    assert len(seen["train_loss"]) == 16 and len(seen["val_loss"]) == 4
    with Store(setup["agent"].paths.store, readonly=True) as store:
        for key, points in seen.items():
            assert sorted(store.metric_series(run_id, key)) == approx_points(sorted(points)), key
        assert store.run(run_id)["params"] == {"lr": 0.05, "width": 4}
    client = MlflowClient(tracking_uri=setup["mlflow"].uri)
    (ml_run,) = ended_mlflow_runs(client, "lightning", run_id)
    assert ml_run.data.params == {"lr": "0.05", "width": "4"}
    assert ml_run.data.tags["lightning.best_model_path"] == callback.best_model_path
    for key, points in seen.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(ml_run.info.run_id, key))
        assert got == approx_points(sorted(points)), key
    deadline = time.monotonic() + 60
    while True:
        tb = tb_scalars(next((tmp / "tb").glob(f"*{run_id}*")))
        if all(len(tb.get(k, [])) >= len(v) for k, v in seen.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for key, points in seen.items():
        assert sorted(tb[key]) == approx_points(sorted(points)), key

    # resume from the best file: weights, optimizer state, step and epoch exactly as saved
    best = callback.best_model_path
    saved = fl_lightning.FlightlogCheckpointIO().load_checkpoint(best)
    capture = Capture()
    logger2 = fl_lightning.FlightlogLogger("lit-run", config, run_id=run_id)  # continues the run
    t2 = trainer(logger2, ckpt_dir, 3, cbs=[capture])
    t2.fit(Tiny(), train, val, ckpt_path=best)
    assert capture.step == saved["global_step"] and capture.epoch == saved["epoch"]
    assert capture.weights.keys() == saved["state_dict"].keys()
    for k, v in saved["state_dict"].items():
        assert torch.equal(capture.weights[k], v), k
    state0, saved0 = capture.optim["state"], saved["optimizer_states"][0]["state"]
    assert state0.keys() == saved0.keys()
    for i in state0:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(state0[i][name]), torch.as_tensor(saved0[i][name])), (i, name)
    assert t2.global_step > saved["global_step"]  # and training went on from there


def test_pytorch_lightning_path_without_a_logger_writes_flightlog_checkpoints(tmp_path: Path) -> None:
    """``import pytorch_lightning``: its Trainer accepts the plugin (its own CheckpointIO class); with no
    flightlog run the files are written by a thread of this process, registered beside them, and top-k works."""
    pl = pytest.importorskip("pytorch_lightning")
    from flightlog.integrations import pytorch_lightning as fl_pl

    class PlTiny(pl.LightningModule):  # the same model on the other package's base class
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        training_step = Tiny.training_step
        validation_step = Tiny.validation_step

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    fl_pl.reset_active()
    io = fl_pl.FlightlogCheckpointIO()
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "pl", save_top_k=1, monitor="val_loss")
    train, val = loaders()
    t = pl.Trainer(max_epochs=2, logger=False, plugins=[io], callbacks=[ck], accelerator="cpu", devices=1,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t.fit(PlTiny(), train, val)
    (kept,) = sorted((tmp_path / "pl").glob("*.ckpt"))
    assert str(kept) == ck.best_model_path
    with Registry(tmp_path / "pl" / "registry.db") as reg:
        assert reg.get(str(kept))["state"] == "done"
        assert [r["state"] for r in reg.entries(str(tmp_path / "pl"), ("deleted",))] in ([], ["deleted"])
    state = io.load_checkpoint(kept)
    assert kept.name == f"epoch={state['epoch']}-step={state['global_step']}.ckpt"
    assert state["state_dict"].keys() == t.lightning_module.state_dict().keys()
    if state["global_step"] == t.global_step:  # the last epoch was the best: the weights training ended with
        for k, v in t.lightning_module.state_dict().items():
            assert torch.equal(state["state_dict"][k], v), k


@pytest.mark.parametrize(("env", "rank", "tracks"), [
    ({}, 0, True), ({}, 1, False),  # Lightning's own launcher: rank 0 only, as its loggers
    ({"TORCHELASTIC_RUN_ID": "j1", "RANK": "1", "WORLD_SIZE": "2"}, 1, True),  # torchrun: every rank joins
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, 1, True),
    ({"TORCHELASTIC_RUN_ID": "j1", "RANK": "0", "WORLD_SIZE": "1"}, 1, False),
])
def test_which_ranks_track(env: dict[str, str], rank: int, tracks: bool) -> None:
    from flightlog.integrations._common import tracks_this_rank

    assert tracks_this_rank(rank, env) is tracks


def test_a_failing_fit_fails_the_run_with_the_traceback(agent: AgentProcess, base_config: dict) -> None:
    class Broken(Tiny):
        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            if idx == 2:
                raise RuntimeError("the loss went away")
            return super().training_step(batch, idx)

    fl_lightning.reset_active()
    logger = fl_lightning.FlightlogLogger("lit-broken", base_config)
    train, _val = loaders()
    t = L.Trainer(max_epochs=1, logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    with pytest.raises(RuntimeError, match="the loss went away"):
        t.fit(Broken(), train)
    row = wait_status(agent.paths, logger.version, "failed")
    assert "RuntimeError: the loss went away" in row["error"]
