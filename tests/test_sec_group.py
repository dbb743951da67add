"""``access.group`` shares a run's data (issue 13, item 2): with it, the store (``flightlog.db`` and its
``-wal``/``-shm`` while the agent runs), the run's plots and the TensorBoard folder the agent created are the
group's, 0640/0750: a member (uid 65534, whose group it is) reads them, a uid outside (65533) does not. The
WAL, the audit log and the run owners stay private. (Without the setting everything stays 0600/0700:
``test_private_files``.)"""
from __future__ import annotations

import grp
import json
import stat
import subprocess
import time
from pathlib import Path

from test_private_files import open_base  # noqa: F401  (a fixture: a 0755 folder in /tmp)

MEMBER, OUTSIDER = 65534, 65533

# What the other user tries, with the system Python (ours is under /root): the store through SQLite,
# read-only, and every file named; one JSON line of what worked.
PROBE = r"""
import json, sqlite3, sys
out = {}
try:
    db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
    out["runs"] = db.execute("SELECT count(*) FROM runs").fetchone()[0]
except sqlite3.Error as exc:
    out["runs"] = str(exc)
for p in sys.argv[2:]:
    try:
        with open(p, "rb") as f:
            out[p] = len(f.read())
    except OSError as exc:
        out[p] = exc.strerror
print(json.dumps(out))
"""


def probe(uid: int, store: Path, files: list[Path]) -> dict[str, object]:
    res = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3",
                          "-c", PROBE, str(store), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def shared(path: Path, gid: int) -> bool:
    st = path.lstat()
    want = 0o750 if stat.S_ISDIR(st.st_mode) else 0o640
    return st.st_gid == gid and stat.S_IMODE(st.st_mode) & 0o777 == want


def wait_shared(paths: list[Path], gid: int) -> None:
    deadline = time.monotonic() + 60
    while not all(p.exists() and shared(p, gid) for p in paths):
        assert time.monotonic() < deadline, [(p, oct(p.lstat().st_mode), p.lstat().st_gid) for p in paths
                                             if p.exists()]
        time.sleep(0.2)


def test_access_group_shares_the_store_plots_and_tensorboard_with_the_group_only(open_base: Path) -> None:  # noqa: F811
    import flightlog
    from flightlog.client import _sidecars

    base = open_base
    group = grp.getgrgid(MEMBER).gr_name
    data = base / "data"
    cfg = {"tracking": {"use_tensorboard": True, "tensorboard_log_dir": str(base / "tb")},
           "access": {"group": group}, "agent": {"autostart": True, "idle_exit_seconds": 0.5}}
    store = data / "flightlog.db"
    with flightlog.experiment_tracking("shared", cfg) as t:
        for s in range(20):
            t.log_metrics({"train/loss": 1.0 / (s + 1), "val/loss": 1.2 / (s + 1)}, step=s)
        t.flush()
        run_id = t.run_id
        deadline = time.monotonic() + 60
        while not list((base / "tb").rglob("*tfevents*")):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        tb_file = next((base / "tb").rglob("*tfevents*"))
        live = [data, store, Path(f"{store}-wal"), Path(f"{store}-shm"), base / "tb", tb_file.parent, tb_file]
        wait_shared(live, MEMBER)  # while the agent runs: its sweep widened what the writers made private
        seen = probe(MEMBER, store, [tb_file])
        assert seen == {"runs": 1, str(tb_file): tb_file.stat().st_size}, seen
        assert stat.S_IMODE(data.stat().st_mode) & stat.S_ISGID  # SQLite's new -wal/-shm are the group's
    assert _sidecars[-1].wait(60) == 0
    plots = data / "runs" / run_id / "plots"
    pngs = sorted(plots.glob("*.png"))
    assert pngs, "the agent renders the plots at the run's end"
    done = [data / "runs", data / "runs" / run_id, plots, *pngs, store]
    assert all(shared(p, MEMBER) for p in done), [(p, oct(p.lstat().st_mode)) for p in done]
    segment = next((data / "wal").glob("*.wal"))
    private = [data / "wal", segment, data / "audit.log", data / "audit.key", data / "agent.lock"]
    assert all(stat.S_IMODE(p.lstat().st_mode) & 0o077 == 0 for p in private if p.exists())
    member = probe(MEMBER, store, [*pngs, tb_file, segment])
    assert member["runs"] == 1 and all(member[str(p)] == p.stat().st_size for p in pngs), member
    assert member[str(segment)] == "Permission denied"  # the WAL is not the group's
    outsider = probe(OUTSIDER, store, [*pngs, tb_file])
    assert outsider["runs"] == "unable to open database file", outsider
    assert all(outsider[str(p)] == "Permission denied" for p in [*pngs, tb_file]), outsider
