"""flightlog.agent.checkpoint: the agent's checkpoint service (staged checkpoints from trainers into files,
the registry, retention, uploads). The file format, reader, writer and registry are the shared core's
(``flightlog.proto.checkpoint``)."""
