"""Secure aggregation (SecAgg+): the coordinator learns only the sum of the deltas."""
