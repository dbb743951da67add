"""The web UI's run page (config, hyper-parameters, environment, git, metrics, system metrics, artifacts,
checkpoints, tags and notes, deletion) and compare page (side by side, config and hyper-parameter diff,
overlaid charts). Streamlit code only; the data comes from ``flightlog.agent.ui.data``."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import streamlit as st

from flightlog.agent.ui import data, queries
from flightlog.agent.ui.widgets import PAGES, agent_paths, chart_panel, open_store, table, when
from flightlog.proto.errors import FlightlogError

__all__ = ["run_page", "compare_page"]

_DOWNLOAD_LIMIT = 1 << 30  # a bigger file: `flightlog ckpt export`, not the browser
_LIVE_SECONDS = 3.0


def _edit_panel(run_id: str, run: dict[str, Any], tags: list[str]) -> None:
    with st.form(f"edit-{run_id}"):
        new_tags = st.text_input("tags (comma separated; key=value for a key-value tag)", ", ".join(tags))
        notes = st.text_area("notes", run.get("description") or "")
        if st.form_submit_button("Save tags and notes"):
            with open_store(write=True) as store:
                queries.set_tags(store, run_id, [t.strip() for t in new_tags.split(",") if t.strip()])
                queries.set_notes(store, run_id, notes)
            st.session_state["saved"] = f"tags and notes of {run_id} saved"
            st.rerun()


def _delete_panel(run_id: str, run: dict[str, Any]) -> None:
    """Deletion in two steps: ask, then confirm (or cancel)."""
    key = f"confirm-delete-{run_id}"
    if run.get("status") == "running":
        st.caption("a running run cannot be deleted")
        return
    if not st.session_state.get(key):
        if st.button("Delete run", key=f"delete-{run_id}"):
            st.session_state[key] = True
            st.rerun()
        return
    st.warning(f"Delete run {run['name']} ({run_id}) from the store? Its metrics, parameters, tags and artifacts "
               "rows go; the WAL, checkpoint files and the checkpoint registry stay.")
    c1, c2 = st.columns(2)
    if c1.button("Yes, delete it", key=f"delete-yes-{run_id}", type="primary"):
        from flightlog.agent.runs_rm import delete_audited  # the store's deletion, with its audit entry

        paths = agent_paths()
        _, rows = delete_audited(paths.store, paths.data_dir, run_id, how=", from the UI")
        st.session_state[key] = False
        st.session_state["deleted"] = f"run {run_id} deleted ({rows} rows)"
        st.switch_page(PAGES["runs"])
    if c2.button("Cancel", key=f"delete-no-{run_id}"):
        st.session_state[key] = False
        st.rerun()


def _checkpoint_panel(run_id: str) -> None:
    rows = data.checkpoints(agent_paths().store, run_id)
    if not rows:
        st.caption("no checkpoints")
        return
    table([{"path": r["path"], "state": r["state"], "step": r["step"], "epoch": r["epoch"],
            "best": "★ best" if r.get("is_best") else "", "size": r["size"], "saved": when(r.get("saved")),
            "metrics": r.get("metrics")} for r in rows])
    done = [r for r in rows if r["state"] == "done"]
    if not done:
        return
    labels = {r["path"]: f"{'★ ' if r.get('is_best') else ''}{Path(r['path']).name} (step {r['step']})" for r in done}
    path = st.selectbox("checkpoint", list(labels), format_func=labels.__getitem__, key=f"ckpt-{run_id}")
    row = next(r for r in done if r["path"] == path)
    c1, c2 = st.columns(2)
    if c1.button("Verify", key=f"verify-{run_id}"):
        result = data.verify_checkpoint(row["path"], row.get("checksum"))
        (st.success if result == "ok" else st.error)(f"{Path(row['path']).name}: {result}")
    try:
        size = os.stat(row["path"]).st_size
    except OSError as exc:
        c2.caption(f"file missing: {exc.strerror}")
        return
    if size <= _DOWNLOAD_LIMIT:
        c2.download_button("Download", functools.partial(Path(row["path"]).read_bytes), file_name=Path(row["path"]).name,
                           key=f"download-{run_id}", on_click="ignore")
    else:
        c2.code(f"flightlog ckpt export {row['path']} --out DIR", language="bash")


def _artifact_panel(arts: list[dict[str, Any]], run_id: str) -> None:
    table([{k: a.get(k) for k in ("name", "kind", "size", "path")} for a in arts])
    for i, a in enumerate(arts):
        p = Path(a["path"])
        if p.is_file() and p.stat().st_size <= _DOWNLOAD_LIMIT:
            st.download_button(f"Download {a['name']}", functools.partial(p.read_bytes), file_name=p.name,
                               key=f"art-{run_id}-{i}", on_click="ignore")


def _overview(d: dict[str, Any]) -> None:
    run = d["run"]
    table([{"field": k, "value": str(run.get(k) if k not in ("created_at", "ended_at") else when(run.get(k)))}
           for k in ("run_id", "name", "status", "created_at", "ended_at", "host", "pid", "config_hash",
                     "description", "error", "dropped")])
    st.subheader("Hyper-parameters")
    table([{"name": k, "value": repr(v)} for k, v in sorted(d["params"].items())])
    if d["ranks"]:
        st.subheader("Ranks")
        table(d["ranks"])


def _run_body(run_id: str) -> None:
    with open_store() as store:
        try:
            d = data.run_details(store, run_id)
        except FlightlogError as exc:
            st.error(str(exc))
            return
        run = d["run"]
        st.title(f"{run['name']}")
        st.caption(f"{run_id} · {run['status']} · started {when(run['created_at'])}")
        if st.session_state.get("saved"):
            st.success(st.session_state.pop("saved"))
        tabs = st.tabs(["Overview", "Metrics", "System", "Config", "Environment", "Git", "Artifacts",
                        "Checkpoints", "Edit"])
        with tabs[0]:
            _overview(d)
        with tabs[1]:
            chart_panel(store, [(run_id, run["name"])], d["metric_keys"], f"run-{run_id}")
        with tabs[2]:
            chart_panel(store, [(run_id, run["name"])], d["system_keys"], f"sys-{run_id}", first=4)
    with tabs[3]:
        st.json(d["config"])
    with tabs[4]:
        md = d["metadata"]
        st.json({k: md.get(k) for k in ("environment", "command", "seed")})
    with tabs[5]:
        git = md.get("git") or {}
        st.write(f"commit `{git.get('commit', '?')}` on `{git.get('branch', '?')}`"
                 f"{' (uncommitted changes)' if git.get('dirty') else ''}")
        st.code(d["git_diff"] or "(no uncommitted diff saved)", language="diff")
    with tabs[6]:
        _artifact_panel(d["artifacts"], run_id)
    with tabs[7]:
        _checkpoint_panel(run_id)
    with tabs[8]:
        _edit_panel(run_id, run, _tags(run))
    st.divider()
    _delete_panel(run_id, run)  # under the tabs: a rerun shows the first tab again, and the question must show


def _tags(run: dict[str, Any]) -> list[str]:
    return [*queries.tag_list(run.get("tags")), *(f"{k}={v}" for k, v in (run.get("tags_kv") or {}).items())]


def run_page() -> None:
    run_id = st.query_params.get("run", "")
    if not run_id:
        st.info("open a run from the runs table")
        return
    with open_store() as store:
        try:
            live = store.run(run_id)["status"] == "running"
        except FlightlogError:
            live = False  # the body says the run is not there

    @st.fragment(run_every=_LIVE_SECONDS if live else None)
    def body() -> None:
        _run_body(run_id)

    body()


def compare_page() -> None:
    ids = [r for r in st.query_params.get("runs", "").split(",") if r]
    if len(ids) < 2:
        st.info("pick two runs or more in the runs table to compare them")
        return
    with open_store() as store:
        try:
            details = [data.run_details(store, r) for r in ids]
        except FlightlogError as exc:
            st.error(str(exc))
            return
        st.title("Compare")
        cols = st.columns(len(details))
        for col, d in zip(cols, details):
            col.subheader(d["run"]["name"])
            col.caption(f"{d['run']['run_id']} · {d['run']['status']} · {when(d['run']['created_at'])}")
        a, b = details[0], details[1]
        for what, key in (("Hyper-parameter", "params"), ("Config", "config")):
            st.subheader(f"{what} differences ({a['run']['name']} vs {b['run']['name']})")
            table([{"key": k, a["run"]["run_id"]: repr(x), b["run"]["run_id"]: repr(y)}
                   for k, x, y in data.diff_runs(a[key], b[key])])
        keys = sorted(set.intersection(*(set(d["metric_keys"]) for d in details)))
        chart_panel(store, [(d["run"]["run_id"], f"{d['run']['name']} ({d['run']['run_id'][:8]})") for d in details],
                    keys, "compare", first=4)
