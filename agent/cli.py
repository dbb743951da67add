"""The `flightlog` command line: agent, status, wal inspect/replay, runs ls/export, plot."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

from flightlog.agent.cliutil import add_location_args, printable, resolve_location
from flightlog.proto.audit import record
from flightlog.proto.errors import FlightlogError

__all__ = ["main", "run_agent"]


def _paths(args: argparse.Namespace) -> Any:
    return resolve_location(args)


def run_agent(args: argparse.Namespace) -> int:
    import anyio

    from flightlog.agent.daemon import Agent, AgentSettings
    from flightlog.proto.config import config_to_dict
    from flightlog.proto.control import AGENT_LOCKED_EXIT
    from flightlog.proto.errors import AgentLocked

    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    paths, cfg = _paths(args)
    raw: dict[str, Any] = config_to_dict(cfg) if cfg is not None else {}
    if getattr(args, "settings_json", None):
        raw = json.loads(args.settings_json)
    settings = AgentSettings.from_config(raw, sidecar=getattr(args, "sidecar", False))
    settings.multi_user = settings.multi_user or getattr(args, "multi_user", False)
    agent = Agent(paths, settings)
    try:
        # Before the event loop: several ranks may start sidecars at once, and the losers just leave
        # (their starters connect to the winner) with one line in the log, not a traceback.
        agent.acquire_lock()
    except AgentLocked as exc:
        print(f"flightlog: {exc}; this one exits (status {AGENT_LOCKED_EXIT}) and clients use that agent",
              file=sys.stderr)
        return AGENT_LOCKED_EXIT

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        agent.stop()
                        return

            tg.start_soon(on_signal)
            await agent.serve()
            tg.cancel_scope.cancel()

    anyio.run(main)
    return 0


def _status(args: argparse.Namespace) -> int:
    from flightlog.proto.control import connect
    from flightlog.proto.events import StatusRequest

    paths, _ = _paths(args)
    client = connect(paths)
    if client is None:
        from flightlog.agent.status_offline import offline_status, print_offline

        # What the data directory tells without an agent: cursors, backlog, parked runs, last errors.
        report = offline_status(paths) if paths.data_dir.is_dir() else {}
        if args.json:  # JSON in every state: scripts parse it whether or not an agent runs
            print(json.dumps({**report, "running": False, "socket": str(paths.socket), "data_dir": str(paths.data_dir),
                              "error": f"no agent on {paths.socket}"}, indent=2))
        else:
            print(f"agent: not running (no agent on {paths.socket}); from the data dir {paths.data_dir}:")
            if report:
                print_offline(report, printable)
        return 1
    try:
        data = client.request(StatusRequest()).data
    finally:
        client.close()
    data["running"] = True
    for name, used in _sinks_in_use(paths, data["sinks"]).items():
        data["sinks"][name]["in_use"] = used
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"agent: up, pid {data['pid']}, uptime {data['uptime_seconds']} s, socket {data['socket']}")
    print(f"data dir: {data['data_dir']}")
    print(f"ingest: {data['events_per_second']} events/s, {data['events_total']} events since start")
    wal = data["wal"]
    print(f"WAL: {wal['segments']} segments, {wal['bytes']} bytes, next seq {wal['next_seq']}")
    for bad in wal.get("bad_segments", []):
        print(f"  unreadable segment {bad['name']} moved to {bad['path']}: {bad['reason']}")
    if wal.get("quarantined_files"):
        print(f"  {wal['quarantined_files']} unreadable segment(s) kept in {wal['quarantine_dir']}: "
              f"see `flightlog wal inspect {data['data_dir']}/wal`")
    print(f"producers: {len(data['producers'])}")
    for p in data["producers"]:
        print(f"  {p['producer']} pid {p['pid']} rank {p['rank']}: {p['events']} events, "
              f"ring backlog {p['backlog_bytes']} B, spilled {p['spilled']}, dropped {p['dropped']}")
    print("sinks:")
    unused = sorted(name for name, s in data["sinks"].items() if not s["in_use"])
    for name, s in data["sinks"].items():
        if not s["in_use"]:
            continue
        line = (f"  {name}: {s['state']}, backlog {s['backlog_events']} events / {s['backlog_bytes']} B, "
                f"{s['events_per_second']} events/s")
        if s.get("quarantined_runs"):
            line += f", quarantined runs: {', '.join(s['quarantined_runs'])}"
        if s["last_error"]:
            line += f", last error: {s['last_error']}"
        print(printable(line))
    if unused:
        print(f"  (no run uses {', '.join(unused)})")
    _print_quarantine(paths)
    for alert in data.get("alerts", []):
        print(f"ALERT: {printable(alert)}")
    return 0


def _sinks_in_use(paths: Any, sinks: dict[str, Any]) -> dict[str, bool]:
    """Per sink: does any run use it? The store serves every run; a backend sink the runs whose RunStart
    names it (the store's ``sink_runs``); a sink in trouble is shown whatever it serves."""
    from flightlog.agent.store import Store

    served: dict[str, bool] = {}
    try:
        store = Store(paths.store, readonly=True) if paths.store.exists() else None
    except FlightlogError:
        store = None
    try:
        for name, s in sinks.items():
            trouble = bool(s["last_error"] or s.get("quarantined_runs")) or s["state"] not in ("ok", "starting")
            served[name] = name == "store" or trouble or (store is not None and bool(store.sink_runs(name)))
    finally:
        if store is not None:
            store.close()
    return served


def _quarantine_rows(store_path: Any) -> list[dict[str, Any]]:
    from flightlog.agent.store import Store

    try:
        store = Store(store_path, readonly=True)
    except FlightlogError:
        return []
    try:
        rows: list[dict[str, Any]] = store.quarantine_rows()
        return rows
    finally:
        store.close()


def _print_quarantine(paths: Any) -> None:
    """What the sinks refused for good (events, or whole runs for a sink), with the reason and the replay."""
    rows = _quarantine_rows(paths.store)
    if not rows:
        return
    print("quarantined (refused for good by one sink; every other run kept flowing):")
    for r in rows:
        what = f"run {r['run_id']} from seq {r['seq']}" if r["scope"] == "run" else \
            f"event seq {r['seq']} of run {r['run_id']}"
        print(printable(f"  {r['sink']}: {what}, {r['events']} events: {r['reason']}"))
    for loc in sorted({r["location"] for r in rows}):
        print(f"  after the fix: flightlog wal replay {loc} --to BACKEND=TARGET")


def _quarantine_by_run(rows: list[dict[str, Any]]) -> dict[str, str]:
    """run id -> "mlflow, store:2" (a sink that quarantined the run; with a count where only events)."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        sinks = out.setdefault(r["run_id"], {})
        sinks[r["sink"]] = -1 if r["scope"] == "run" or sinks.get(r["sink"]) == -1 else \
            sinks.get(r["sink"], 0) + int(r["events"] or 0)
    return {run: ", ".join(s if n < 0 else f"{s}:{n}" for s, n in sorted(sinks.items()))
            for run, sinks in out.items()}


def _wal_inspect(args: argparse.Namespace) -> int:
    from flightlog.agent.wal import inspect_wal

    report = inspect_wal(_wal_dir(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"WAL {report['directory']}")
    for seg in report["segments"]:
        print(f"  {seg['name']}: seq {seg['first_seq']}..{seg['last_seq']}, {seg['records']} records, "
              f"{seg['events']} events, {seg['bytes']} bytes")
        for c in seg["corrupt"]:
            print(f"    CORRUPT at byte {c['offset']} ({c['length']} bytes): {c['reason']}")
        if seg.get("torn_tail_bytes"):
            print(f"    torn tail: {seg['torn_tail_bytes']} bytes")
        if seg.get("error"):
            print(f"    UNREADABLE: {seg['error']}")
    for q in report.get("quarantined", []):
        print(f"  quarantined {q['path']} ({q['bytes']} bytes): {q['reason']}")
    t = report["totals"]
    print("totals: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return 0


def _wal_dir(args: argparse.Namespace) -> Any:
    """The WAL to inspect: DIR itself when it holds segments, DIR/wal when DIR is a data directory, the
    data directory's (from --data-dir / --config / the environment) when no DIR is given."""
    from pathlib import Path

    if args.dir is None:
        wal = _paths(args)[0].wal_dir
        if not wal.is_dir():
            raise FlightlogError(f"no WAL at {wal} (data directory from {args.location}); pass DIR, --data-dir "
                                 "or --config")
        return wal
    d = Path(args.dir)
    if not d.is_dir():
        raise FlightlogError(f"{d}: no such directory; pass a WAL directory (DATA_DIR/wal) or a data directory")
    if any(n.endswith(".wal") for n in os.listdir(d)):
        return d
    if (d / "wal").is_dir():
        return d / "wal"  # a data directory
    raise FlightlogError(f"{d} holds no WAL: no segment (*.wal) in it and no wal/ directory under it; pass the "
                         "agent's WAL directory (DATA_DIR/wal), its data directory, or a quarantine directory")


def _store(args: argparse.Namespace) -> Any:
    from flightlog.agent.store import Store

    paths, _ = _paths(args)
    if not paths.store.exists():
        raise FlightlogError(f"no flightlog store at {paths.store} (data directory from {args.location}); "
                             "pass --data-dir or --config of the agent the runs used")
    return Store(paths.store, readonly=True)


def _runs_ls(args: argparse.Namespace) -> int:
    import datetime

    store = _store(args)
    try:
        runs = store.runs()
        quarantined = _quarantine_by_run(store.quarantine_rows())
    finally:
        store.close()
    for r in runs:
        r["quarantined"] = quarantined.get(r["run_id"], "")
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{'RUN':18} {'NAME':28} {'STATUS':10} {'POINTS':>8}  {'CREATED':19}  QUARANTINED")
    for r in runs:
        created = datetime.datetime.fromtimestamp(r["created_at"] or 0).isoformat(timespec="seconds")
        print(f"{printable(r['run_id']):18} {printable(r['name'])[:28]:28} {printable(r['status'] or ''):10} "
              f"{r['points']:>8}  {created:19}  {printable(r['quarantined'])}")
    return 0


def _export_via_agent(args: argparse.Namespace) -> int:
    """The run as the agent reads it for us (a multi-user agent's store is not ours to open)."""
    from flightlog.proto.control import connect
    from flightlog.proto.events import RunExportRequest

    paths, _ = _paths(args)
    client = connect(paths)
    if client is None:
        raise FlightlogError(f"no agent on {paths.socket} to export run {args.run} through; start it, or pass "
                             "--data-dir of a store you can read")
    try:
        reply = client.request(RunExportRequest(args.run, args.key), timeout=300)
    finally:
        client.close()
    if not reply.ok:
        raise FlightlogError(reply.error)
    run = reply.data
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        if args.format == "jsonl":
            for point in run["metrics"]:
                out.write(json.dumps(point) + "\n")
        else:
            out.write(json.dumps(run, indent=2) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _runs_export(args: argparse.Namespace) -> int:
    store_path = _paths(args)[0].store
    if args.via_agent or (store_path.exists() and not os.access(store_path, os.R_OK)):
        return _export_via_agent(args)
    store = _store(args)
    try:
        run_id = store.resolve_run(args.run)
        record("run.export", f"run:{run_id}", run=run_id, data_dir=_paths(args)[0].data_dir,
               detail=f"format {args.format}" + (f", key {args.key}" if args.key else ""))
        if args.key is not None and args.key not in (keys := store.metric_keys(run_id)):
            raise FlightlogError(f"run {run_id} has no metric {args.key!r}; its keys: "
                                 f"{', '.join(repr(k) for k in keys[:50]) or 'none'}{' ...' if len(keys) > 50 else ''}")
        out = open(args.out, "w") if args.out else sys.stdout
        try:
            if args.format == "jsonl":
                for point in store.metric_points(run_id, args.key):
                    out.write(json.dumps(point) + "\n")
            else:  # the run and its points (of --key, or all): one document
                run = store.run(run_id)
                run["ranks"] = store.rank_table(run_id)
                run["metrics"] = list(store.metric_points(run_id, args.key))
                out.write(json.dumps(run, indent=2, default=str) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
    finally:
        store.close()
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    from flightlog.agent.runs_show import show_run

    store = _store(args)
    try:
        print(show_run(store, store.resolve_run(args.run), as_json=args.json))
    finally:
        store.close()
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flightlog.agent.plots import render_plots

    paths, _ = _paths(args)
    if args.via_agent or (paths.store.exists() and not os.access(paths.store, os.R_OK)):
        from flightlog.agent.fdpass import plots_via_agent

        for path in plots_via_agent(paths, args.run, Path(args.out) if args.out else None):
            print(printable(str(path)))
        return 0
    store = _store(args)
    try:
        run_id = store.resolve_run(args.run)
    finally:
        store.close()
    out = Path(args.out) if args.out else paths.data_dir / "runs" / run_id / "plots"
    record("run.plot", f"run:{run_id}", run=run_id, data_dir=paths.data_dir, detail=f"to {out}")
    written = render_plots(paths.store, run_id, out)
    if not written:
        print(f"run {run_id} has no loss or accuracy metrics to plot")
    for path in written:
        print(printable(path))
    return 0


def _add_runs(sub: Any, common: Any) -> None:
    """``flightlog runs ls|export|show|rm``."""
    r = sub.add_parser("runs", help="runs in the local store")
    rsub = r.add_subparsers(dest="runs_command", required=True)
    rl = rsub.add_parser("ls", help="list runs")
    common(rl)
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=_runs_ls)
    re_ = rsub.add_parser("export", help="export a run's metric points (jsonl), or the run with its points (json)")
    common(re_)
    re_.add_argument("run", help="run id, id prefix or name")
    re_.add_argument("--format", choices=["jsonl", "json"], default="jsonl")
    re_.add_argument("--key", help="only this metric")
    re_.add_argument("--out", help="file to write (default: stdout)")
    re_.add_argument("--via-agent", action="store_true",
                     help="ask the agent to read it (a multi-user agent's runs; the default when the store is "
                          "not readable)")
    re_.set_defaults(func=_runs_export)
    rs = rsub.add_parser("show", help="one run: status, config hash, git, command line, environment, params")
    common(rs)
    rs.add_argument("run", help="run id, id prefix or name")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=_runs_show)
    from flightlog.agent.runs_rm import add_subparser as add_rm

    add_rm(rsub, common)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flightlog", description="flightlog: experiment tracking and checkpoints")
    sub = p.add_subparsers(dest="command", required=True)

    common = add_location_args

    a = sub.add_parser("agent", help="run the agent in the foreground (node daemon)")
    common(a)
    a.add_argument("--sidecar", action="store_true", help="exit once producers are gone and sinks caught up")
    a.add_argument("--multi-user", action="store_true",
                   help="node-wide agent for every user (run it as a service account): runs are owned by the uid "
                        "that logs them, readable by it, access.group and root")
    a.add_argument("--settings-json", help=argparse.SUPPRESS)
    a.add_argument("-v", "--verbose", action="store_true")
    a.set_defaults(func=run_agent)

    s = sub.add_parser("status", help="is the agent up; producers, rates, backlog per sink")
    common(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)

    w = sub.add_parser("wal", help="write-ahead log tools")
    wsub = w.add_subparsers(dest="wal_command", required=True)
    wi = wsub.add_parser("inspect", help="segments, records, seq ranges, corrupt spots")
    wi.add_argument("dir", nargs="?", help="a WAL directory or a data directory (default: the data directory's)")
    common(wi)
    wi.add_argument("--json", action="store_true")
    wi.set_defaults(func=_wal_inspect)
    from flightlog.agent.replay import add_subparsers as add_replay

    rp = add_replay(wsub)
    common(rp)
    replay = rp.get_default("func")

    def replay_located(args: argparse.Namespace) -> int:
        args.dir = str(_wal_dir(args))  # DIR, DIR/wal of a data directory, or the data directory's WAL
        record("wal.replay", f"wal:{args.dir}", data_dir=_paths(args)[0].data_dir)
        return int(replay(args))

    rp.set_defaults(func=replay_located)

    _add_runs(sub, common)

    pl = sub.add_parser("plot", help="render a run's plots (loss, accuracy, log scale, overfitting) as PNGs")
    common(pl)
    pl.add_argument("run", help="run id, id prefix or name")
    pl.add_argument("--out", help="directory for the PNGs (default: <data dir>/runs/<run id>/plots)")
    pl.add_argument("--via-agent", action="store_true",
                    help="the run's plots as the agent has them (a multi-user agent's runs; the default when the "
                         "store is not readable), copied into --out (default ./plots-RUN)")
    pl.set_defaults(func=_plot)

    from flightlog.agent.ckpt_cli import add_subparsers as add_ckpt

    add_ckpt(sub)
    from flightlog.agent.audit_cli import add_subparsers as add_audit

    add_audit(sub)
    from flightlog.agent.secrets_cli import add_subparsers as add_secrets

    add_secrets(sub)
    from flightlog.agent.ui.server import add_subparser as add_ui

    add_ui(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlightlogError as exc:
        print(f"flightlog: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `flightlog runs export RUN | head`
        sys.stderr.close()
        return 0
    except OSError as exc:
        print(f"flightlog: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
