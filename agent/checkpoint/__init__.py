"""flightlog.agent.checkpoint: the agent's checkpoint writer, format, registry and retention."""
