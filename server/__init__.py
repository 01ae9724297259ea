"""fedgraft's ServerApp: the coordinator that aggregates adapter deltas."""
