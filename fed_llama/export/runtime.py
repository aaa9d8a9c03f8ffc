"""Run an exported model with onnxruntime, tokenizers and numpy only: no torch.

This is the edge runtime: the chat template is rendered with jinja2 (as transformers does),
tokens come from the ``tokenizers`` library, and decoding keeps a KV cache (the graph's
``present.N.key/value`` outputs are fed back as ``past_key_values.N.key/value``). Graphs whose
attention writes the new keys and values into the past buffer in place (the builder's
GroupQueryAttention: ``past_present_share_buffer`` in ``genai_config.json``) decode with one
preallocated buffer per cache tensor, bound once through an IOBinding, so no step copies the
cache; other graphs (the plain route's concatenation) get their cache fed back as arrays.
Greedy, temperature and top-p sampling; generation stops at the end-of-turn token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fed_llama.errors import FedLlamaError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
README = "README.md"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph: ``input_ids``, ``attention_mask``,
    ``past_key_values.N.key/value`` in; ``logits``, ``present.N.key/value`` out (the builder's
    interface, which the plain route copies)."""
    cache_in = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    cache_out = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", *cache_in], ["logits", *cache_out]


class EdgeRuntimeError(FedLlamaError):
    """An exported model folder cannot be loaded or run."""


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of the decoder graph, read from the folder's ``genai_config.json``."""

    layers: int
    kv_heads: int
    head_size: int
    eos_ids: tuple[int, ...]
    context_length: int
    share_buffer: bool = False
    """The graph writes ``present`` into ``past`` in place when both are one buffer."""


def read_spec(folder: Path) -> DecoderSpec:
    path = folder / GENAI_CONFIG
    try:
        config = json.loads(path.read_text())
        model = config["model"]
        decoder = model["decoder"]
        eos = model["eos_token_id"]
        return DecoderSpec(layers=int(decoder["num_hidden_layers"]),
                           kv_heads=int(decoder["num_key_value_heads"]),
                           head_size=int(decoder["head_size"]),
                           eos_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
                           context_length=int(model["context_length"]),
                           share_buffer=bool(config.get("search", {}).get(
                               "past_present_share_buffer", False)))
    except FileNotFoundError:
        raise EdgeRuntimeError(f"{str(folder)!r} has no {GENAI_CONFIG}: give a folder written by "
                            "`fed-llama export`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgeRuntimeError(f"{path} is not a valid decoder description ({exc!r}): export the "
                            "model again") from None


def render_chat(template: str, messages: Sequence[dict[str, str]], *,
                add_generation_prompt: bool = True, **tokens: str) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed jinja2)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt,
                                            **tokens)


def sample_next(logits: np.ndarray, temperature: float, top_p: float,
                rng: np.random.Generator) -> int:
    """The next token: argmax when ``temperature`` is 0, else top-p sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest set reaching top_p
    kept = order[keep]
    q = p[kept] / p[kept].sum()
    return int(kept[rng.choice(len(kept), p=q)])


class OnnxCausalLM:
    """An exported decoder with its tokenizer and chat template."""

    def __init__(self, folder: Path, *, threads: int = 0, adapter: str | None = None) -> None:
        """Load the export in ``folder``; ``adapter``: a runtime adapter's name (in
        ``adapters/``) or ``.onnx_adapter`` file to use instead of the built-in one."""
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise EdgeRuntimeError(f"the edge runtime needs onnxruntime and tokenizers ({exc}): "
                                "pip install onnxruntime tokenizers") from None
        self.folder = folder
        missing = [name for name in (MODEL_FILE, GENAI_CONFIG, "tokenizer.json")
                   if not (folder / name).is_file()]
        if missing and (folder / MODEL_FILE).is_file():  # a partial copy of an export
            raise EdgeRuntimeError(f"{str(folder)!r} lacks {', '.join(missing)}: copy "
                                   f"{'it' if len(missing) == 1 else 'them'} from the export "
                                   f"folder (its {README} lists the files to ship)")
        self.spec = read_spec(folder)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for bad files
            raise EdgeRuntimeError(f"{folder / MODEL_FILE} cannot be loaded by onnxruntime "
                                   f"{ort.__version__} ({str(exc).splitlines()[0][:200]}): "
                                   f"copy every file its {README} lists, with the onnxruntime "
                                   "version it names, or export it again") from None
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.template, self.special = _chat_template(folder)
        self._outputs = [o.name for o in self.session.get_outputs()]
        inputs, outputs = io_names(self.spec.layers)
        self._cache_in, self._cache_out = inputs[2:], outputs[1:]
        self._run_options = ort.RunOptions()
        self.adapter = adapter
        self._adapter_inputs: dict[str, Any] = {}
        """The adapter's tensors by input name, for :class:`InPlaceDecoding`'s binding."""
        if adapter is not None:
            adapter_file = str(_adapter_file(folder, adapter))
            self._lora = ort.LoraAdapter()  # must outlive the run options that use it
            self._lora.Load(adapter_file)
            self._run_options.add_active_adapter(self._lora)
            if self.spec.share_buffer:  # read once, bound by every in-place decoding
                self._adapter_inputs = ort.AdapterFormat.read_adapter(
                    adapter_file).get_parameters()
        self._dtype = np.float16 if "float16" in self.session.get_inputs()[2].type else np.float32

    # -- the graph -------------------------------------------------------------------------
    def empty_cache(self) -> list[np.ndarray]:
        shape = (1, self.spec.kv_heads, 0, self.spec.head_size)
        return [np.zeros(shape, self._dtype) for _ in range(2 * self.spec.layers)]

    def forward(self, ids: Sequence[int], past: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``[len(ids), vocab]`` of ``ids`` after ``past``, and the grown cache."""
        total = past[0].shape[2] + len(ids)
        feed: dict[str, Any] = {"input_ids": np.asarray([ids], dtype=np.int64),
                                "attention_mask": np.ones((1, total), dtype=np.int64)}
        feed.update(zip(self._cache_in, past, strict=True))
        out = dict(zip(self._outputs, self.session.run(None, feed, self._run_options),
                       strict=True))
        return out["logits"][0].astype(np.float32), [out[name] for name in self._cache_out]

    def sequence_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of ``ids`` (one prefill, empty cache)."""
        return self.forward(ids, self.empty_cache())[0]

    def decoding(self, capacity: int) -> Decoding:
        """A decoding state for one sequence of at most ``capacity`` tokens: give it the
        prompt, then each new token; the cache stays inside (in place where the graph can)."""
        if self.spec.share_buffer:
            return InPlaceDecoding(self, capacity)
        return ArrayDecoding(self, capacity)

    # -- text ------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = render_chat(self.template, messages, add_generation_prompt=True, **self.special)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def generate_ids(self, prompt: Sequence[int], *, max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
                     ) -> Iterator[int]:
        """Yield new token ids until an end token or ``max_new_tokens``."""
        if len(prompt) + max_new_tokens > self.spec.context_length:
            raise EdgeRuntimeError(f"prompt ({len(prompt)} tokens) + --max-new-tokens "
                                f"({max_new_tokens}) exceeds the model's context of "
                                f"{self.spec.context_length} tokens: shorten one of them")
        rng = np.random.default_rng(seed)
        decoding = self.decoding(len(prompt) + max_new_tokens)
        logits = decoding.step(prompt)
        for _ in range(max_new_tokens):
            token = sample_next(logits[-1], temperature, top_p, rng)
            if token in self.spec.eos_ids:
                return
            yield token
            logits = decoding.step([token])

    def chat(self, messages: Sequence[dict[str, str]], **kwargs: Any) -> Iterator[str]:
        """Stream the assistant's reply as text pieces (decoded incrementally)."""
        ids: list[int] = []
        shown = ""
        for token in self.generate_ids(self.encode_chat(messages), **kwargs):
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            yield text[len(shown):]
            shown = text

    def answer(self, messages: Sequence[dict[str, str]], max_new_tokens: int) -> str:
        """A greedy answer as one string (for task evaluation)."""
        return "".join(self.chat(messages, max_new_tokens=max_new_tokens)).strip()


class Decoding:
    """One sequence being decoded: :meth:`step` feeds tokens and returns their logits."""

    def __init__(self, lm: OnnxCausalLM, capacity: int) -> None:
        self.lm = lm
        self.capacity = capacity
        self.length = 0
        """Tokens in the cache so far."""

    def step(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` of ``ids`` after everything fed so far."""
        if self.length + len(ids) > self.capacity:
            raise EdgeRuntimeError(f"{self.length + len(ids)} tokens exceed this decoding's "
                                   f"capacity of {self.capacity}: start it with a larger one")
        logits = self._run(ids)
        self.length += len(ids)
        return logits

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError


class ArrayDecoding(Decoding):
    """The cache as numpy arrays, fed back each step (graphs that concatenate the cache)."""

    def __init__(self, lm: OnnxCausalLM, capacity: int) -> None:
        super().__init__(lm, capacity)
        self.cache = lm.empty_cache()

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        logits, self.cache = self.lm.forward(ids, self.cache)
        return logits


class InPlaceDecoding(Decoding):
    """One ``capacity``-long buffer per cache tensor, bound as both past and present: the
    graph's attention writes each step's keys and values into it in place, reading only the
    first ``length + new`` positions (the attention mask's length), so no step copies it."""

    def __init__(self, lm: OnnxCausalLM, capacity: int) -> None:
        import onnxruntime as ort

        super().__init__(lm, capacity)
        spec = lm.spec
        self.binding = lm.session.io_binding()
        # onnxruntime applies active adapters in run(), not in run_with_iobinding: bind the
        # adapter's tensors as the inputs they override
        for name, value in lm._adapter_inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_output("logits", "cpu")  # bound first: output 0 (reallocated per run)
        shape = (1, spec.kv_heads, capacity, spec.head_size)
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, lm._dtype, "cpu")
                        for _ in lm._cache_in]
        for past, present, buffer in zip(lm._cache_in, lm._cache_out, self.buffers,
                                         strict=True):
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        total = self.length + len(ids)
        self.binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        self.binding.bind_output("logits", "cpu")  # its shape changes with len(ids)
        self.lm.session.run_with_iobinding(self.binding, self.lm._run_options)
        logits: np.ndarray = self.binding.get_outputs()[0].numpy()
        return logits[0].astype(np.float32)


def _adapter_file(folder: Path, adapter: str) -> Path:
    path = Path(adapter)
    if path.suffix == ".onnx_adapter" and path.is_file():
        return path
    named = folder / "adapters" / f"{adapter}.onnx_adapter"
    if named.is_file():
        return named
    known = sorted(p.name[:-len(".onnx_adapter")] for p in (folder / "adapters").glob(
        "*.onnx_adapter")) if (folder / "adapters").is_dir() else []
    raise EdgeRuntimeError(f"--lora {adapter!r}: no such runtime adapter in {folder} (has: "
                           f"{', '.join(known) or 'none; export with --set runtime_adapters=true'}"
                           ")")


def _chat_template(folder: Path) -> tuple[str, dict[str, str]]:
    """The chat template and the special tokens it may use (bos_token, eos_token)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template_file = folder / "chat_template.jinja"
    template = (template_file.read_text() if template_file.is_file()
                else config.get("chat_template"))
    if not isinstance(template, str) or not template:
        raise EdgeRuntimeError(f"{str(folder)!r} has no chat template: copy "
                               "chat_template.jinja (or tokenizer_config.json) from the export "
                               "folder, or export the model again")
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    return template, {k: v for k, v in special.items() if v}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value) if value else ""
