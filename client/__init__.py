"""fedgraft's ClientApp: local LoRA fine-tuning at a data-owning site."""
