"""Settings of LLaMA-Adapter V1 (``[llama_adapter]`` in a scenario or site config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaAdapterConfig:
    """LLaMA-Adapter V1 (Zhang et al. 2023): ``prompt_length`` learnable adaption prompts in
    each of the top ``layers`` layers, attended to by every query through its own softmax and
    added to the attention output through a zero-initialized gate (peft's
    ``AdaptionPromptConfig``; the saved folder loads with plain ``PeftModel.from_pretrained``).
    """

    prompt_length: int = 10
    """Adaption prompt vectors per adapted layer (the paper's 10)."""

    layers: int = 30
    """How many of the top layers are adapted (SmolLM2-135M has 30: all of them)."""

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.prompt_length <= 512:
            out.append(f"prompt_length must be in [1, 512]; got {self.prompt_length}")
        if self.layers < 1:
            out.append(f"layers must be at least 1; got {self.layers}")
        return out
