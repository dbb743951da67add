"""A trainer of another uid (65534) logging to a real multi-user agent run as root (issue 13, item 3), with no
``FLIGHTLOG_TRANSPORT`` set: the agent cannot open that user's private ring folder, so the SDK sees the agent
is another uid's and sends its events over the socket; every event arrives in the store, owned by 65534. Its
checkpoints are written in its own process: the root agent refuses to write files for another uid (at a
path, from a staging file, that uid names)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import AgentProcess
from test_access import OTHER, as_uid, open_paths  # noqa: F401  (open_paths: a fixture)

import flightlog
import flightlog.checkpoint  # noqa: F401  (imported before the fork: the other uid cannot read our site-packages)
import flightlog.tracker  # noqa: F401
from flightlog.agent.cli import main
from flightlog.proto.audit import AuditLog
from flightlog.proto.events import CheckpointRequest, CheckpointSpec, CheckpointWait
from flightlog.proto.paths import AgentPaths

STEPS = 300
_CHILD = ("import sys; from pathlib import Path; sys.path.insert(0, '.'); "
          "from test_sec_trainer import _train_as; _train_as(int(sys.argv[1]), Path(sys.argv[2]))")


def _train_as(uid: int, home: Path) -> None:
    """The child: become ``uid`` and run a whole tracked run; exit 0 once it finished cleanly."""
    code = 1
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        os.environ.pop("FLIGHTLOG_TRANSPORT", None)
        os.environ["FLIGHTLOG_DATA_DIR"] = str(home / "data")  # their own: the agent's is not theirs to write
        cfg = {"agent": {"autostart": False}, "tracking": {"use_tensorboard": False},
               "monitoring": {"create_plots": False, "log_gpu_usage": False, "log_memory_usage": False},
               "checkpointing": {"checkpoint_dir": str(home / "ckpt")}}
        with flightlog.experiment_tracking("theirs", cfg) as t:
            for s in range(STEPS):
                t.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
            saved = t.save_checkpoint(torch.nn.Linear(2, 2), 0, STEPS).wait()  # in this process, as this uid
            (home / "run_id").write_text(json.dumps([t.run_id, saved.path]))
        code = 0
    except BaseException:
        (home / "error").write_text(traceback.format_exc())  # the parent shows it
    finally:
        os._exit(code)


def test_a_trainer_of_another_uid_logs_to_a_multi_user_agent(open_paths: AgentPaths,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    base = open_paths.data_dir.parent
    shm, home = base / "shm", base / "theirs"
    shm.mkdir(mode=0o1777)
    os.chmod(shm, 0o1777)  # like /dev/shm
    home.mkdir()
    os.chown(home, OTHER, OTHER)
    agent = AgentProcess(open_paths, ["--multi-user"]).start()
    try:
        # A fresh interpreter that imports what it needs as root, then becomes the other uid: a fork of this
        # test process would inherit whatever lock another thread of the suite held at that moment.
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(OTHER), str(home)], cwd=Path(__file__).parent)
        try:
            code = child.wait(90)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            pytest.fail("the other uid's run did not finish in 90 s")
        assert code == 0, (home / "error").read_text()
        run_id, ckpt = json.loads((home / "run_id").read_text())
        spec = CheckpointSpec(path="/etc/flightlog-pwned", staging="/etc/shadow", data_bytes=0, tensors=[],
                              metadata={}, epoch=0, step=0, request_id="r1")
        refused = as_uid(OTHER, open_paths.socket, [CheckpointRequest.of(spec), CheckpointWait("r1")])
        capsys.readouterr()
        assert main(["runs", "export", run_id, "--via-agent", "--format", "json"]) == 0  # root reads every run
        run = json.loads(capsys.readouterr().out)
    finally:
        agent.stop()
    assert all(not r.ok and f"uid {OTHER} may not have this agent" in r.error for r in refused), refused
    assert not os.path.exists("/etc/flightlog-pwned")
    assert os.stat(ckpt).st_uid == OTHER  # the trainer's own file, written by it, not by the root agent
    denied = [(e.uid, e.detail) for e in AuditLog(open_paths.data_dir).entries() if e.action == "access.refused"]
    assert denied == [(OTHER, "checkpoint write through a multi-user agent")] * 2, denied
    assert run["status"] == "completed"
    assert sorted(p["step"] for p in run["metrics"] if p["key"] == "loss") == list(range(STEPS))
    owners = json.loads((open_paths.data_dir / "run_owners.json").read_text())
    assert owners[run_id] == OTHER
    assert not any((shm / f"flightlog-{OTHER}").rglob("*.ring"))  # no ring the agent could never open
