"""Settings of LLaMA-Adapter V2 (``[llama_adapter_v2]`` in a scenario or site config)."""

from __future__ import annotations

from dataclasses import dataclass

V2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaAdapterV2Config:
    """LLaMA-Adapter V2 on a text LLaMA (Gao et al. 2023).

    Every adapted linear projection becomes ``y = s ⊙ (W·x + b₀ + b)`` with a learnable
    output-sized scale ``s`` (ones at init) and bias ``b`` (zeros); every RMSNorm weight is
    trained; and, unless ``prompts = false``, the top ``prompt_layers`` layers get
    ``prompt_length`` gated adaption prompts as in V1 (gate zero at init). ``prompts = false``
    is the paper's prompt-free "bias + scale + norm" recipe of its text-only chat model.
    Early fusion of visual tokens needs a vision encoder and is out of scope.
    """

    prompts: bool = True
    """Add V1's gated adaption prompts in the top layers (false: bias + scale + norm only)."""

    prompt_length: int = 10
    """Prompt vectors per adapted layer (the paper's 10)."""

    prompt_layers: int = 30
    """How many of the top layers get prompts (SmolLM2-135M has 30 layers: all of them)."""

    target_modules: tuple[str, ...] = V2_TARGETS
    """Linear projections that get a bias and a scale."""

    train_norms: bool = True
    """Train every RMSNorm weight (input, post-attention and final norms)."""

    def problems(self) -> list[str]:
        out = []
        if self.prompts and not 1 <= self.prompt_length <= 512:
            out.append(f"prompt_length must be in [1, 512]; got {self.prompt_length}")
        if self.prompts and self.prompt_layers < 1:
            out.append(f"prompt_layers must be at least 1; got {self.prompt_layers}")
        unknown = sorted(set(self.target_modules) - set(V2_TARGETS))
        if unknown:
            out.append(f"target_modules {unknown} are not LLaMA projections "
                       f"({', '.join(V2_TARGETS)})")
        if not self.target_modules and not self.prompts and not self.train_norms:
            out.append("nothing to train: give target_modules, prompts = true or "
                       "train_norms = true")
        return out
