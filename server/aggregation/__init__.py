"""Aggregation rules: one small module per rule, selected by name."""

from server.aggregation.fedavg import FedAvg

__all__ = ["FedAvg"]
