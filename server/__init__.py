"""fedgraft's ServerApp: the coordinator that aggregates adapter deltas."""

from common.console import quiet_library_noise

# Every process that runs the ServerApp imports this package first: keep the libraries'
# per-run noise off its console before peft (and bitsandbytes) load.
quiet_library_noise()
