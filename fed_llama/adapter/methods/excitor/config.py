"""Settings of LLaMA-Excitor (``[excitor]`` in a scenario or site config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExcitorConfig:
    """LLaMA-Excitor (Zou et al., CVPR 2024): in the top ``layers`` layers, ``prompt_length``
    learnable prompts and a rank-``rank`` Excitor block reconstruct an extra key for every
    input token; the extra similarity enters the attention logits through a zero-initialized
    gate, so training starts from the frozen model's output. Values are unchanged."""

    prompt_length: int = 10
    """Learnable prompt vectors per Excitor layer."""

    layers: int = 30
    """How many of the top layers get an Excitor block (SmolLM2-135M has 30)."""

    rank: int = 16
    """Rank of the Excitor block's projections (the paper's 16)."""

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.prompt_length <= 512:
            out.append(f"prompt_length must be in [1, 512]; got {self.prompt_length}")
        if self.layers < 1:
            out.append(f"layers must be at least 1; got {self.layers}")
        if not 1 <= self.rank <= 1024:
            out.append(f"rank must be in [1, 1024]; got {self.rank}")
        return out
