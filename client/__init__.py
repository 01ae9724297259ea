"""fedgraft's ClientApp: local LoRA fine-tuning at a data-owning site."""

from common.console import quiet_library_noise

# Every process that runs the ClientApp imports this package first: keep the libraries'
# per-run noise off its console before peft (and bitsandbytes) load.
quiet_library_noise()
