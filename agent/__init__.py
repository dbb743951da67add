"""flightlog.agent: the sidecar daemon (ingest, WAL, sinks, control server, CLI)."""
__all__: list[str] = []
