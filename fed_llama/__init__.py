"""fed-llama: federated LoRA/QLoRA fine-tuning of LLaMA-family models."""

__version__ = "0.1.0"
