"""A round with one hostile site: its update is refused with its reason, the honest sites'
updates are aggregated as if it had not been there."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import save

from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.crypto import ReplayGuard, ServerKey, SiteKey, TrustStore, seal_envelope
from fed_llama.crypto.envelope import SIGNATURE_BYTES
from fed_llama.server.security import ServerGuard
from fed_llama.server.strategy import LoraFedAvg, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

NOW = 1_800_000_000.0
NAMES = ["cardiology", "oncology", "psychiatry", "neurology"]  # neurology turns hostile
A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
SERVER = ServerKey.generate()
KEYS = {name: SiteKey.generate(name) for name in NAMES}
TRUST = TrustStore()
for _key in KEYS.values():
    TRUST.enroll(_key.public())
G = torch.Generator().manual_seed(0)
CURRENT = {A: torch.randn(2, 5, generator=G), B: torch.zeros(6, 2)}
HONEST = [{k: v + 0.01 * torch.randn(v.shape, generator=G) for k, v in CURRENT.items()}
          for _ in range(3)]
EXAMPLES = [10.0, 20.0, 30.0]


def envelope(state: dict[str, torch.Tensor], site: str = "neurology", server_round: int = 2,
             key: SiteKey | None = None, examples: float = 40.0) -> bytes:
    return seal_envelope(save(state), site_key=key or KEYS[site], server=SERVER.public(),
                         run="run-t", server_round=server_round, clock=lambda: NOW,
                         metrics={"num-examples": examples, "train-loss": 1.0})


def shifted(scale: float) -> dict[str, torch.Tensor]:
    return {k: CURRENT[k] + scale * (HONEST[0][k] - CURRENT[k]) for k in CURRENT}


def flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[-SIGNATURE_BYTES - 7] ^= 0x10
    return bytes(out)


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "forged signature": (lambda: envelope(HONEST[0], key=SiteKey.generate("neurology")),
                         "bad-signature"),
    "unknown site": (lambda: envelope(HONEST[0], key=SiteKey.generate("mallory")),
                     "unknown-site"),
    "envelope replayed from round 1": (lambda: envelope(HONEST[0], server_round=1), "replayed"),
    "truncated ciphertext": (lambda: envelope(HONEST[0])[:-300], "truncated"),
    "flipped ciphertext bit": (lambda: flip(envelope(HONEST[0])), "bad-signature"),
    "wrong tensor names": (lambda: envelope({"x.lora_A.weight": CURRENT[A], B: CURRENT[B]}),
                           "wrong-names"),
    "wrong shapes": (lambda: envelope({A: torch.zeros(3, 5), B: CURRENT[B]}), "wrong-shape"),
    "wrong dtype": (lambda: envelope({A: CURRENT[A].double(), B: CURRENT[B]}), "wrong-dtype"),
    "NaN": (lambda: envelope({A: torch.full((2, 5), float("nan")), B: CURRENT[B]}),
            "non-finite"),
    "Inf": (lambda: envelope({A: CURRENT[A], B: torch.full((6, 2), float("inf"))}),
            "non-finite"),
    "norm 1000x the honest ones": (lambda: envelope(shifted(1000.0)), "norm-bound"),
    "oversized payload": (lambda: envelope({A: CURRENT[A], B: CURRENT[B],
                                            "pad": torch.zeros(200_000)}), "oversized"),
    "garbage bytes": (lambda: b"\x89PNG garbage " * 50, "malformed"),
}


def run_round(tmp_path: Path, hostile: bytes) -> tuple[LoraFedAvg, dict[str, float],
                                                       dict[str, torch.Tensor] | None]:
    scenario = build_config(ScenarioConfig, {"federation": {
        "sites": [f"icd10:{n}" for n in NAMES]}}, source="test")
    cfg = scenario.security
    guard = ServerGuard(cfg, SERVER, TRUST, "run-t", tmp_path / "seals", clock=lambda: NOW,
                        guard=ReplayGuard())
    rows: dict[int, dict[str, float]] = {}
    strategy = build_strategy(scenario, NAMES, round_offset=1,
                              on_train=lambda r, row: rows.__setitem__(r, row),
                              on_evaluate=lambda *_: None, security=guard)
    sent = list(strategy.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(),
                                         FakeGrid(4)))  # type: ignore[arg-type]
    assert all(m.content.config_records["config"]["fed-round"] == 2 for m in sent)
    sealed = [envelope(state, NAMES[i], examples=EXAMPLES[i]) for i, state in enumerate(HONEST)]
    sealed.append(hostile)
    replies = [Message(RecordDict({
        "metrics": MetricRecord({"num-examples": 1, "site": i}),
        "envelope": ConfigRecord({"sealed": data})}), reply_to=msg)
        for i, (msg, data) in enumerate(zip(sent, sealed, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, rows.get(2, {}), arrays.to_torch_state_dict() if arrays else None


def honest_mean() -> dict[str, torch.Tensor]:
    total = sum(EXAMPLES)
    return {k: torch.stack([w / total * s[k] for w, s in zip(EXAMPLES, HONEST, strict=True)]
                           ).sum(0) for k in CURRENT}


def test_the_honest_round_aggregates_all_four(tmp_path: Path) -> None:
    _, row, new = run_round(tmp_path, envelope(HONEST[0]))
    assert row["sites-trained"] == 4 and row["sites-refused"] == 0
    assert new is not None


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_update_is_refused_and_the_round_goes_on(tmp_path: Path, case: str) -> None:
    make, reason = HOSTILE[case]
    _, row, new = run_round(tmp_path, make())
    assert row["sites-refused"] == 1 and row[f"refused/{reason}"] == 1, row
    assert row["sites-trained"] == 3
    assert new is not None
    # the honest sites' weights come from their signed envelopes: 10, 20 and 30 examples
    for k, v in honest_mean().items():
        assert torch.allclose(new[k], v, atol=1e-6)


def test_sites_accept_the_round_seal_only_for_the_adapter_sent(tmp_path: Path) -> None:
    from fed_llama.client.security import check_round
    from fed_llama.crypto import Refused

    run_round(tmp_path, envelope(HONEST[0]))
    text = (tmp_path / "seals" / "round-002.json").read_text()
    cfg = build_config(ScenarioConfig, {}, source="test").security
    config = {"run-id": "run-t", "round-seal": text}
    assert check_round(cfg, SERVER.public(), config, CURRENT, 2) == "run-t"
    with pytest.raises(Refused, match="not the one the aggregator sealed"):
        check_round(cfg, SERVER.public(), config, HONEST[0], 2)
    with pytest.raises(Refused, match="sent no round seal"):
        check_round(cfg, SERVER.public(), {"run-id": "run-t"}, CURRENT, 2)
