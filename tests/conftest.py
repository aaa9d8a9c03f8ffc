"""Shared fixtures: a tiny random LLaMA with a tiny ChatML tokenizer, saved as a HF folder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "What is the ICD-10-CM code for acute myocardial infarction? I21.9",
    "What does ICD-10-CM code I10 describe? Essential (primary) hypertension",
    "system user assistant You are a helpful assistant. The capital of France is Paris.",
    "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,;:!?\"'()-",
]


def build_tiny_backbone(path: Path) -> Path:
    """Write a 2-layer random LlamaForCausalLM and a byte-level BPE tokenizer to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _exec_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> ModuleType:
    """The benchmark script ``benchmarks/<name>.py`` loaded from its file, without putting
    benchmarks/ (edge.py, poisoning.py, ...) on sys.path for the rest of the test session. The
    shared ``harness`` the scripts import is loaded the same way, once."""
    if "harness" not in sys.modules:
        sys.modules["harness"] = _exec_benchmark("harness")
    return _exec_benchmark(name)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A fed-llama cache of this test session's own (``FED_LLAMA_CACHE``, inherited by the
    Ray workers and Flower processes the tests start), so no test reads a site's encoded data
    that an earlier session kept; its ``backbones/`` is the user's, so the default backbone is
    converted once, not once per session."""
    from fed_llama.backbone.cache import cache_root

    shared = cache_root() / "backbones"
    shared.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("fed-llama-cache")
    (root / "backbones").symlink_to(shared, target_is_directory=True)
    before = os.environ.get("FED_LLAMA_CACHE")
    os.environ["FED_LLAMA_CACHE"] = str(root)
    yield root
    if before is None:
        os.environ.pop("FED_LLAMA_CACHE", None)
    else:
        os.environ["FED_LLAMA_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def write_jsonl(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write lines (dicts as JSON, strings verbatim) to a JSONL file and return its path."""

    def write(lines: list[object], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                                for x in lines))
        return path

    return write


def qa_records(n: int) -> list[dict[str, str]]:
    """``n`` small instruction records over the tiny tokenizer's vocabulary."""
    return [{"instruction": f"What does ICD-10-CM code I{10 + i % 7} describe?",
             "output": "Essential (primary) hypertension" if i % 2 else "acute myocardial"}
            for i in range(n)]


def dirichlet_scenario(backbone: Path, write: Any) -> Any:
    """Two JSONL sources (30 and 20 records, written with the ``write_jsonl`` fixture's
    function) pooled and dealt to 3 sites by a Dirichlet(1.0) partition, on ``backbone``."""
    from fed_llama.config.loader import build_config
    from fed_llama.config.scenario import ScenarioConfig

    a = write(qa_records(30), name="a.jsonl")
    b = write(qa_records(20), name="b.jsonl")
    return build_config(ScenarioConfig, {
        "backbone": {"name": str(backbone)},
        "federation": {"sites": [str(a), str(b)], "partition": "dirichlet",
                       "num_partitions": 3, "dirichlet_alpha": 1.0}}, source="test")


@pytest.fixture
def flower_task():  # type: ignore[no-untyped-def]
    """Flower stamps messages with the run of the process; outside a run, give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    """The part of Flower's Grid a strategy's ``configure_*`` uses: ``n`` connected nodes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return [11 * (i + 1) for i in range(self.n)]


def run_without_torch(*cli: str) -> subprocess.CompletedProcess[str]:
    """``fed-llama CLI...`` in a fresh interpreter in which torch, transformers, flwr, peft and
    cryptography cannot be imported (what an edge device has)."""
    blocked = ("torch", "transformers", "flwr", "peft", "cryptography")
    script = (
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fed_llama.cli.main import main\n"
        f"sys.exit(main({list(cli)!r}))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
