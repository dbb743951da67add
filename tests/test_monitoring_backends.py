"""Issue 5 through the backends: system stats and plots reach TensorBoard event files and MLflow."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import AgentProcess

import flightlog


@pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")
def test_system_stats_and_plots_arrive_in_tensorboard_and_mlflow(agent: AgentProcess, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = tmp_path / "tb"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = {
        "tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(tb_dir), "use_mlflow": True,
                     "mlflow_tracking_uri": uri, "mlflow_experiment_name": "monitoring"},
        "monitoring": {"interval_seconds": 0.3, "create_plots": True},
        "agent": {"autostart": False},
    }
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()  # create the store's tables now: two processes creating them at once race
    with flightlog.experiment_tracking("monitored", cfg) as t:
        for step in range(40):
            t.log_metrics({"train/loss": 1.0 / (step + 1), "val/loss": 1.2 / (step + 1),
                           "train/accuracy": step / 40, "val/accuracy": step / 45}, step=step)
            time.sleep(0.05)
        time.sleep(1.5)  # a few monitor samples

    deadline = time.monotonic() + 90
    tags: dict = {}
    artifacts: list[str] = []
    system_keys: set[str] = set()
    while time.monotonic() < deadline:
        runs = list(tb_dir.glob("*"))
        if runs:
            acc = EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0})
            acc.Reload()
            tags = acc.Tags()
        exp = client.get_experiment_by_name("monitoring")
        if exp is not None:
            found = client.search_runs([exp.experiment_id])
            if found:
                run = found[0]
                system_keys = {k for k in run.data.metrics if k.startswith("system/")}
                artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        if (any(s.startswith("system/cpu") for s in tags.get("scalars", []))
                and any(i.startswith("plots/") for i in tags.get("images", [])) and artifacts and system_keys):
            break
        time.sleep(0.5)
    assert any(s.startswith("system/cpu") for s in tags["scalars"]), tags["scalars"]
    assert any(s.startswith("system/memory") for s in tags["scalars"])
    assert not any(s.startswith("system/system/") for s in tags["scalars"])
    assert any(i.startswith("plots/") for i in tags["images"]), tags.get("images")
    assert any(k.startswith("system/cpu") for k in system_keys) and not any("system/system" in k for k in system_keys)
    assert artifacts and all(a.endswith(".png") for a in artifacts)
