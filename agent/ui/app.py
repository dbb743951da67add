"""The Streamlit script `flightlog ui` serves: the pages (runs, run, compare, agent) and the runs page itself.
Run by ``streamlit run`` (``flightlog.agent.ui.server``), with ``-- --data-dir DIR --socket PATH``."""
from __future__ import annotations

import streamlit as st

from flightlog.agent.ui import agent_view, data, queries
from flightlog.agent.ui.widgets import PAGES, agent_paths, open_store, table, when
from flightlog.proto.errors import FlightlogError

__all__ = ["main", "runs_page", "agent_page"]

_STATUSES = ["", "running", "completed", "failed", "crashed", "killed"]


def _filters() -> data.RunFilter:
    c = st.columns(5)
    return data.RunFilter(name=c[0].text_input("name or id", key="f-name"), tag=c[1].text_input("tag", key="f-tag"),
                          status=str(c[2].selectbox("status", _STATUSES, key="f-status", format_func=lambda s: s or "any") or ""),
                          config_hash=c[3].text_input("config hash", key="f-hash"),
                          host=c[4].text_input("host", key="f-host"))


def _open_controls(shown: list[queries.RunRow], selected: list[int]) -> None:
    """Open one run or compare several: the rows ticked in the table, or ids/names typed in."""
    picked = [shown[i].run_id for i in selected if i < len(shown)]
    c1, c2 = st.columns(2)
    ref = c1.text_input("open a run (id, id prefix or name)", key="open-ref")
    if c1.button("Open run", key="open-run") and (ref or picked):
        with open_store() as store:
            try:
                run_id = store.resolve_run(ref) if ref else picked[0]
            except FlightlogError as exc:
                st.error(str(exc))
                return
        st.switch_page(PAGES["run"], query_params={"run": run_id})
    refs = c2.text_input("compare runs (ids, prefixes or names, comma separated)", key="compare-refs")
    if c2.button("Compare runs", key="compare-runs"):
        with open_store() as store:
            try:
                ids = [store.resolve_run(r.strip()) for r in refs.split(",") if r.strip()] or picked
            except FlightlogError as exc:
                st.error(str(exc))
                return
        if len(ids) < 2:
            st.error("pick two runs or more to compare (tick them in the table, or type them)")
            return
        st.switch_page(PAGES["compare"], query_params={"runs": ",".join(ids)})


def runs_page() -> None:
    st.title("Runs")
    if st.session_state.get("deleted"):
        st.success(st.session_state.pop("deleted"))
    with open_store() as store:
        rows = queries.runs_table(store)
    f = _filters()
    c1, c2 = st.columns([3, 1])
    key = str(c1.selectbox("sort by", data.SORT_KEYS, key="sort-key"))
    shown = data.sort_runs(data.filter_runs(rows, f), key, descending=c2.checkbox("descending", True, key="sort-desc"))
    st.caption(f"{len(shown)} of {len(rows)} runs")
    event = st.dataframe(data.runs_columns(shown), hide_index=True, on_select="rerun",
                         selection_mode="multi-row", key="runs-table")
    _open_controls(shown, list(event.selection.rows) if event is not None else [])


def agent_page() -> None:
    st.title("Agent")
    st.button("Refresh", key="agent-refresh")
    paths = agent_paths()
    with open_store() as store:
        view = agent_view.agent_overview(paths, store)
    live = view["live"]
    if live is None:
        st.info(f"no agent answers on {paths.socket}: what the data directory {view['data_dir']} holds")
    else:
        st.success(f"agent up: pid {live['pid']}, {live['events_per_second']} events/s, "
                   f"{live['events_total']} events since start")
        for alert in live.get("alerts", []):
            st.error(f"alert: {alert}")
        st.subheader("Sinks (live)")
        table([{"sink": name, **{k: s.get(k) for k in ("state", "backlog_events", "backlog_bytes", "retries",
                                                        "last_error", "quarantined_runs")}}
               for name, s in live["sinks"].items()])
    st.subheader("Sinks (cursors in the store)")
    st.caption(f"WAL: {view['wal']['segments']} segments, {view['wal']['bytes']:,} bytes")
    table([{**s, "updated": when(s["updated"])} for s in view["sinks"]])
    st.subheader("Parked (quarantined) runs and events")
    table([{**q, "ts": when(q["ts"])} for q in view["quarantine"]])
    st.subheader("Checkpoint writes (newest first)")
    table([{**c, "saved": when(c["saved"])} for c in view["checkpoint_writes"]])
    if view["offline_status"] is not None:
        with st.expander("offline status (flightlog status)"):
            st.json(view["offline_status"])


def main() -> None:
    from flightlog.agent.ui import run_page

    st.set_page_config(page_title="flightlog", layout="wide")
    PAGES.update(runs=st.Page(runs_page, title="Runs", url_path="runs", default=True),
                 run=st.Page(run_page.run_page, title="Run", url_path="run"),
                 compare=st.Page(run_page.compare_page, title="Compare", url_path="compare"),
                 agent=st.Page(agent_page, title="Agent", url_path="agent"))
    st.navigation(list(PAGES.values())).run()


if __name__ == "__main__":
    main()
