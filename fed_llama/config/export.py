"""Configuration of an edge export (``fed-llama export``): an export profile.

Profiles live in ``edge_export/profiles/*.toml``; every default works on the default backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: The acceptance bound on the held-out perplexity increase over PyTorch fp32, per quantization,
#: used when ``verify.max_perplexity_increase`` is negative.
DEFAULT_PPL_BOUND = {"fp32": 0.01, "int8": 0.02, "int4": 0.15}
BLOCK_SIZES = (16, 32, 64, 128, 256)
MIXED_SELECTORS = ("last_matmul", "mixed_layers")


@dataclass(frozen=True)
class VerifyConfig:
    """How the exported model is checked against the PyTorch merged model before it is kept."""

    data: tuple[str, ...] = field(default=(), metadata={"path": True, "schemes": ("icd10:",)})
    """Held-out data to compare on: ``icd10:<site>`` names or JSONL files. Empty: the adapter's
    own data (its training source, or ``icd10:<site>`` for each site of a federated round)."""

    records: int = 48
    """Held-out records per data source for perplexity and next-token agreement (seeded)."""

    max_length: int = 256
    """Tokens per record."""

    max_perplexity_increase: float = -1.0
    """Refuse the export when ONNX held-out perplexity exceeds PyTorch's by more than this
    fraction (0.02 = 2%). Negative: the bound of the quantization (fp32 1%, int8 2%,
    int4 15%)."""

    min_top1_agreement: float = 0.0
    """Refuse the export when greedy next-token agreement with PyTorch is below this (0-1)."""

    questions: int = 8
    """Held-out questions per task per data source answered by both models and scored
    (exact/category match, token F1); 0: off."""

    max_new_tokens: int = 24
    """Answer length bound for the task questions."""

    prefill_tokens: int = 256
    """Prompt length for the prefill latency measurement."""

    decode_tokens: int = 64
    """Tokens generated for the decode speed measurement."""

    seed: int = 0
    """Seed of the held-out sample and of the ICD-10 held-out code split."""

    def problems(self) -> list[str]:
        out = []
        for name in ("records", "max_length", "prefill_tokens", "decode_tokens",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.questions < 0:
            out.append(f"questions must be 0 (off) or more; got {self.questions}")
        if not 0 <= self.min_top1_agreement <= 1:
            out.append(f"min_top1_agreement must be in [0, 1]; got {self.min_top1_agreement}")
        return out


@dataclass(frozen=True)
class ExportConfig:
    """An export profile: precision, quantization recipe and verification bounds."""

    name: str = "custom"
    """The profile's name, recorded in the export manifest."""

    exporter: Literal["builder", "torch"] = "builder"
    """How the ONNX graph is made: ``builder`` (onnxruntime-genai's model builder: fused
    attention, block-wise int8/int4; the fastest graphs measured here; the branches of adapter
    methods that do not fold, V1 and V2 prompts and the Excitor's keys, are grafted onto it as
    fp32 constants) or ``torch`` (plain ``torch.onnx.export`` of the merged model with a KV
    cache, branches traced: for a LLaMA-family variant the builder cannot build, or as an
    independent cross-check of the builder's graph; int8/int4 with ``algorithm = 'default'``
    or int4 ``'gptq'``)."""

    quant: Literal["fp32", "int8", "int4"] = "int8"
    """Weight precision of the ONNX model: fp32, or block-wise int8/int4 (MatMulNBits). The LM
    head is quantized too, and the tied embedding shares its quantized table (int8: re-quantized
    round-to-nearest and read by ``GatherBlockQuantized``; an untied table stays fp32)."""

    block_size: int = 32
    """Weights per quantization block (16-256). This backbone's hidden size (576) is not a
    multiple of 128: 128 and 256 pad the last block and lose quality."""

    algorithm: Literal["default", "rtn", "k_quant", "gptq"] = "default"
    """int4/int8 weight quantizer: ``default`` (onnxruntime's MatMulNBits round-to-nearest),
    ``rtn`` (the builder's RTN quantizer) or ``k_quant`` (llama.cpp-style search of scales),
    which need no data; or ``gptq`` (int4 only): the decoder's projections quantized by GPTQ,
    calibrated on the training records of the verification sources (see
    ``calibration_records``), the LM head as ``k_quant`` (round-to-nearest with
    ``exporter = 'torch'``)."""

    calibration_records: int = 64
    """``gptq``: calibration records per verification source, drawn from its training split
    (ICD-10 sites) or, for a JSONL file, from its records not used for verification."""

    mixed_precision: tuple[str, ...] = ()
    """MatMul groups kept in 8-bit in an int4 model: ``last_matmul`` (the LM head) and/or
    ``mixed_layers`` (the most sensitive layers: first/last eighth and every third
    qkv/v/down projection)."""

    accuracy_level: int = 4
    """Activation precision of quantized MatMuls on CPU: 4 = int8 (fastest), 1 = fp32."""

    runtime_adapters: bool = False
    """Keep the adapter switchable instead of merging it (LoRA: the builder's LoRA branches;
    LLaMA-Adapter V1 and Excitor: their grafted branch constants as graph inputs): the
    export's own adapter is built in, and other adapters of the same method and shape (rank
    and targets; prompt length and layers) become ``adapters/<name>.onnx_adapter`` files
    (``fed-llama export-adapter``) chosen at run time (``generate --lora``). A LoRA export
    decodes somewhat slower than a merged one. V2 cannot switch (its biases and scales are
    folded into the backbone's weights)."""

    verify: VerifyConfig = field(default_factory=VerifyConfig)
    """Verification against PyTorch; the export is refused when it fails."""

    def problems(self) -> list[str]:
        out = []
        if self.block_size not in BLOCK_SIZES:
            out.append(f"block_size must be one of {BLOCK_SIZES}; got {self.block_size}")
        unknown = [m for m in self.mixed_precision if m not in MIXED_SELECTORS]
        if unknown:
            out.append(f"mixed_precision has unknown group(s) {unknown}: use "
                       f"{list(MIXED_SELECTORS)}")
        if self.mixed_precision and self.quant != "int4":
            out.append(f"mixed_precision {list(self.mixed_precision)} only applies to "
                       f"quant = 'int4' (got quant = {self.quant!r}): remove it or use int4")
        if self.algorithm == "gptq" and self.quant != "int4":
            out.append(f"algorithm = 'gptq' is calibrated int4 (got quant = {self.quant!r}): "
                       "use quant = 'int4', or algorithm = 'default' for int8")
        if self.algorithm == "gptq" and self.runtime_adapters:
            out.append("algorithm = 'gptq' calibrates the merged weights but runtime_adapters "
                       "keeps the adapter unmerged: use algorithm = 'k_quant' with runtime "
                       "adapters, or turn runtime_adapters off")
        if self.exporter == "torch" and self.quant != "fp32" and (
                self.algorithm not in ("default", "gptq")):
            out.append(f"exporter = 'torch' quantizes with onnxruntime's MatMulNBits "
                       f"round-to-nearest or GPTQ only (got algorithm = {self.algorithm!r}): "
                       "set algorithm = 'default' or 'gptq', or use exporter = 'builder'")
        if self.exporter == "torch" and "mixed_layers" in self.mixed_precision:
            out.append("exporter = 'torch' keeps only the LM head in 8-bit (got mixed_precision "
                       f"= {list(self.mixed_precision)}): use ['last_matmul'], or use "
                       "exporter = 'builder'")
        if self.exporter == "torch" and self.runtime_adapters:
            out.append("exporter = 'torch' exports the merged model; runtime_adapters needs the "
                       "builder's graph (its LoRA branches or grafted constants): use "
                       "exporter = 'builder'")
        if self.calibration_records < 1:
            out.append(f"calibration_records must be at least 1; got {self.calibration_records}")
        if self.accuracy_level not in (1, 2, 3, 4):
            out.append(f"accuracy_level must be 1, 2, 3 or 4; got {self.accuracy_level}")
        return out

    def perplexity_bound(self) -> float:
        """The allowed relative perplexity increase over PyTorch fp32."""
        bound = self.verify.max_perplexity_increase
        return DEFAULT_PPL_BOUND[self.quant] if bound < 0 else bound
