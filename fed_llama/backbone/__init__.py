"""The frozen LLaMA backbone: finding it, converting GGUF once, loading it (fp32, bf16, NF4)."""

from fed_llama.backbone.load import (
    BUILTIN,
    Backbone,
    ResolvedBackbone,
    load_backbone,
    load_tokenizer,
    resolve_backbone,
)

__all__ = ["BUILTIN", "Backbone", "ResolvedBackbone", "load_backbone", "load_tokenizer",
           "resolve_backbone"]
