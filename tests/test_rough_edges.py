"""The rough edges a new user hit (issue "Where users already train", item 5), end to end through a real agent,
a real MLflow server, W&B offline and TensorBoard: git/command capture reaching every backend and `runs show`,
images and figures, the best checkpoint found by the monitored metric, named checkpoints, a step that restarts
every epoch, and should_checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import AgentProcess, new_id
from conftest_backends import (
    MlflowServer,
    drive,
    ended_mlflow_runs,
    mlflow_server,  # noqa: F401  (the module's server fixture)
    run_events,
    tb_accumulator,
    wandb_exit_codes,
    wandb_history,
    write_wal,
)

import flightlog
from flightlog.agent.sinks import WandBTracker
from flightlog.agent.sinks.wandb_sink import GIVEN_STEP_KEY, wandb_run_id
from flightlog.agent.store import Store
from flightlog.media import figure_png, image_png
from flightlog.proto.events import Metrics, RunEnd
from flightlog.proto.paths import AgentPaths

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(300)


def _git_repo(root: Path) -> str:
    """A git checkout with one commit and an uncommitted change; returns the commit."""
    root.mkdir()
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (root / "train.py").write_text("print('train')\n")
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    (root / "train.py").write_text("print('train, changed')\n")
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def test_a_run_reaches_every_backend_with_capture_images_and_restarting_steps(
        mlflow_server: MlflowServer, agent_paths: AgentPaths, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    matplotlib.use("Agg")
    commit = _git_repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    experiment = f"edges-{new_id()}"
    wb, tb = tmp_path / "wandb", tmp_path / "tb"
    config = {
        "model": {"layers": 2, "width": 8}, "training": {"lr": 0.01, "epochs": 2},
        "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(tb), "use_mlflow": True,
                     "mlflow_tracking_uri": mlflow_server.uri, "mlflow_experiment_name": experiment,
                     "use_wandb": True, "wandb_mode": "offline", "wandb_dir": str(wb)},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt"), "save_frequency": 5},
        "agent": {"autostart": False},
    }
    agent = AgentProcess(agent_paths).start()
    try:
        model = torch.nn.Linear(4, 2)
        t = flightlog.ExperimentTracker("edges", config)
        assert t.config.experiment == {"model": {"layers": 2, "width": 8}, "training": {"lr": 0.01, "epochs": 2}}
        for epoch in range(2):  # the system description's own loop: the step restarts every epoch
            for step in range(5):
                t.log_metrics({"loss": float(epoch * 10 + step)}, step=step)
        t.log_image("attention", np.linspace(0, 1, 64).reshape(8, 8), step=3)
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot([1, 3, 2])
        t.log_figure("curve", fig, step=4)
        # best by the monitored metric (checkpointing.monitor defaults to val_loss), no is_best=
        paths = [t.save_checkpoint(model, epoch=0, step=s, val_loss=v) for s, v in ((5, 0.5), (10, 0.3), (15, 0.4))]
        named = t.save_checkpoint(model, epoch=1, step=20, name="warmup-end")
        assert Path(named).name.startswith(f"ckpt-{t.run_id}-warmup-end.")
        t.flush()
        assert t.get_best_checkpoint() == str(paths[1])
        before = t.metadata.config_hash
        t.log_hyperparameters({"optimizer": {"name": "adam", "beta1": 0.9}})
        assert t.metadata.config_hash != before  # the run's hash covers the logged hyper-parameters
        with torch.no_grad():
            model.weight.zero_()
        assert t.load_checkpoint("warmup-end", model) == (1, 20)
        assert model.weight.abs().sum() > 0
        run_id, digest = t.run_id, t.metadata.config_hash
        t.finish()

        [ml] = ended_mlflow_runs(MlflowClient(mlflow_server.uri), experiment, run_id)
        assert wandb_exit_codes(wb, wandb_run_id(run_id)) == [0]
    finally:
        agent.stop()

    # MLflow: the user's sections as dotted params, git and command as MLflow's own source tags
    assert ml.data.params["model.layers"] == "2" and ml.data.params["training.lr"] == "0.01"
    assert ml.data.params["optimizer.name"] == "adam"
    tags = ml.data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["mlflow.source.git.branch"] == "main"
    assert tags["flightlog.git.dirty"] == "true" and tags["flightlog.command"]
    assert tags["flightlog.config_hash"] == digest
    client = MlflowClient(mlflow_server.uri)
    artifacts = {a.path for a in client.list_artifacts(ml.info.run_id, "flightlog")}
    assert "flightlog/capture.json" in artifacts
    capture = json.loads(Path(client.download_artifacts(ml.info.run_id, "flightlog/capture.json",
                                                        str(tmp_path))).read_text())
    assert capture["git"]["commit"] == commit and capture["environment"]["packages"]
    images = [a.path for a in client.list_artifacts(ml.info.run_id, "images")]
    assert any("attention" in p for p in images) and any("curve" in p for p in images), images
    history = client.get_metric_history(ml.info.run_id, "loss")
    assert sorted(m.value for m in history) == [float(e * 10 + s) for e in range(2) for s in range(5)]

    # W&B: every row, at a global step that only increases, with the given step as a field; git in config
    rows, wconfig, _ = wandb_history(wb, wandb_run_id(run_id))
    loss_rows = [r for r in rows if "loss" in r]
    assert [r["loss"] for r in loss_rows] == [float(e * 10 + s) for e in range(2) for s in range(5)]
    steps = [r["_step"] for r in loss_rows]
    assert steps == sorted(steps) and len(set(steps)) == 10
    assert [r.get(GIVEN_STEP_KEY) for r in loss_rows[5:]] == [0, 1, 2, 3, 4]
    assert any("attention/_type" in r for r in rows) and any("curve/_type" in r for r in rows)  # W&B images
    assert wconfig["flightlog"]["git"]["commit"] == commit and wconfig["model.layers"] == 2
    log_text = agent.read_log()
    assert log_text.count("step went back to") == 1, log_text[-3000:]

    # TensorBoard: both images
    [run_dir] = [p for p in tb.iterdir() if p.is_dir()]
    assert {"attention", "curve"} <= set(tb_accumulator(run_dir).Tags()["images"])

    # the local store and `flightlog runs show`
    with Store(agent_paths.store, readonly=True) as store:
        row = store.run(run_id)
        assert row["config_hash"] == digest and row["params"]["model"] == {"layers": 2, "width": 8}
    shown = subprocess.run([sys.executable, "-m", "flightlog.agent.cli", "runs", "show", run_id, "--data-dir",
                            str(agent_paths.data_dir)], capture_output=True, text=True, check=True).stdout
    assert commit in shown and "(dirty" in shown and "on main" in shown and digest in shown
    assert "model = " in shown and "python " in shown
    as_json = json.loads(subprocess.run(
        [sys.executable, "-m", "flightlog.agent.cli", "runs", "show", run_id, "--json", "--data-dir",
         str(agent_paths.data_dir)], capture_output=True, text=True, check=True).stdout)
    assert as_json["git"]["commit"] == commit and "packages" not in as_json["environment"]


def test_wandb_gets_a_global_step_per_rank_and_resumes_it(tmp_path: Path) -> None:
    """Steps 0..4 twice: ten rows, none lost; the shift survives a restart of the sink (state on disk)."""
    wb = tmp_path / "wandb"
    tracking = {"wandb_mode": "offline", "wandb_dir": str(wb), "wandb_project": "p"}
    evs = run_events("ws", "restarts", tracking, steps=5, keys=["loss"], sinks=["wandb"], end=False)
    t0 = 1.8e9
    evs += [Metrics("ws", s, t0 + s, {"loss": 100.0 + s}) for s in range(5)]
    write_wal(tmp_path / "wal", evs)
    [runner] = drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    assert runner.stats.state == "ok", runner.stats.last_error
    more = [Metrics("ws", s, t0 + 10 + s, {"loss": 200.0 + s}) for s in range(3)] + [RunEnd("ws", "completed", t0 + 20)]
    write_wal(tmp_path / "wal", more)
    [runner] = drive([WandBTracker(tmp_path / "state")], tmp_path / "wal", tmp_path / "db.sqlite")
    rows, _, _ = wandb_history(wb, wandb_run_id("ws"))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sorted(losses) == sorted([*(s * 10.0 for s in range(5)), *(100.0 + s for s in range(5)),
                                     *(200.0 + s for s in range(3))])
    by_step = Counter(r["_step"] for r in rows if "loss" in r)
    assert max(by_step.values()) == 1 and sorted(by_step) == list(range(13))


def test_should_checkpoint_every_n_steps(agent: AgentProcess, base_config: dict) -> None:
    base_config["checkpointing"]["save_frequency"] = 3
    t = flightlog.ExperimentTracker("freq", base_config)
    try:
        assert [s for s in range(10) if t.should_checkpoint(s)] == [3, 6, 9]  # not step 0: nothing trained yet
    finally:
        t.finish()
    base_config["checkpointing"]["save_frequency"] = 0
    t = flightlog.ExperimentTracker("never", base_config)
    try:
        assert not any(t.should_checkpoint(s) for s in range(10))
    finally:
        t.finish()


def test_checkpoint_names_are_checked(agent: AgentProcess, base_config: dict) -> None:
    t = flightlog.ExperimentTracker("names", base_config)
    try:
        model = torch.nn.Linear(2, 2)
        for bad in ("best", "latest", "a/b", "", "x" * 101):
            with pytest.raises(ValueError, match="checkpoint name"):
                t.save_checkpoint(model, name=bad)
        first = t.save_checkpoint(model, step=1, name="phase-1")
        again = t.save_checkpoint(model, step=2, name="phase-1")  # the same name replaces the run's own file
        assert first == again
        t.flush()
        assert t.load_checkpoint("phase-1", model) == (0, 2)
    finally:
        t.finish()


@pytest.mark.parametrize(("shape", "mode"), [((6, 5), "L"), ((6, 5, 3), "RGB"), ((3, 6, 5), "RGB"),
                                             ((6, 5, 4), "RGBA"), ((1, 6, 5), "L"), ((6, 5, 1), "L")])
def test_image_png_layouts(shape: tuple[int, ...], mode: str) -> None:
    import io

    from PIL import Image

    arr = np.random.default_rng(0).random(shape)
    img = Image.open(io.BytesIO(image_png(arr)))
    assert (img.mode, img.size) == (mode, (5, 6))
    assert Image.open(io.BytesIO(image_png(torch.from_numpy(arr)))).tobytes() == img.tobytes()
    as_u8 = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert Image.open(io.BytesIO(image_png(as_u8))).tobytes() == img.tobytes()
    assert Image.open(io.BytesIO(image_png(img))).tobytes() == img.tobytes()


def test_image_png_refuses_what_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="shape"):
        image_png(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="shape"):
        image_png(np.zeros((5, 5, 7)))  # neither H×W×C nor C×H×W
    with pytest.raises(TypeError, match="dtype"):
        image_png(np.array([["a"]], dtype=object))
    with pytest.raises(TypeError, match="matplotlib Figure"):
        figure_png(np.zeros((2, 2)))
