"""A round with one hostile site: its update is refused with its reason, the honest sites'
updates are aggregated as if it had not been there."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from safetensors.torch import save

from fed_llama import wire
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.crypto import ReplayGuard, ServerKey, SiteKey, TrustStore, make_envelope
from fed_llama.crypto.envelope import INFO, MAGIC, SIGNATURE_BYTES
from fed_llama.crypto.refusal import Refused
from fed_llama.server.security import ServerGuard
from fed_llama.server.strategy import build_strategy

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
    return make_envelope(save(state), site_key=key or KEYS[site], server=SERVER.public(),
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


def run_round(tmp_path: Path, hostile: bytes, *, names: list[str] = NAMES,
              trust: TrustStore = TRUST, sealed: list[bytes] | None = None,
              federation: dict[str, object] | None = None,
              reply: Callable[[Message], Message] | None = None
              ) -> tuple[Strategy, dict[str, float], dict[str, torch.Tensor] | None]:
    """One round of the honest sites' envelopes and ``hostile`` (or ``sealed``, every
    site's; ``reply`` makes the last site's whole reply instead)."""
    scenario = build_config(ScenarioConfig, {"federation": {
        "sites": [f"icd10:{n}" for n in names], **(federation or {})}}, source="test")
    cfg = scenario.security
    guard = ServerGuard(cfg, SERVER, trust, "run-t", tmp_path / "seals", clock=lambda: NOW,
                        guard=ReplayGuard())
    rows: dict[int, dict[str, float]] = {}
    strategy = build_strategy(scenario, names, round_offset=1,
                              on_train=lambda r, row: rows.__setitem__(r, row),
                              on_evaluate=lambda *_: None, security=guard)
    sent = list(strategy.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(),
                                         FakeGrid(len(names))))  # type: ignore[arg-type]
    assert all(m.content.config_records["config"]["fed-round"] == 2 for m in sent)
    if sealed is None:
        sealed = [envelope(state, NAMES[i], examples=EXAMPLES[i])
                  for i, state in enumerate(HONEST)]
        sealed.append(hostile)
    replies = [Message(RecordDict({
        "metrics": MetricRecord({"num-examples": 1, "site": i}),
        wire.ENVELOPE: ConfigRecord({wire.ENVELOPE_BYTES: data})}), reply_to=msg)
        for i, (msg, data) in enumerate(zip(sent, sealed, strict=True))]
    if reply is not None:
        replies[-1] = reply(sent[-1])
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


# --- Structured hostile values: anyone (no key) or an enrolled site ----------------------

def unsigned(header: str) -> bytes:
    """An envelope anyone can send: a hand-made header, junk ciphertext, no valid signature."""
    head = header.encode("utf-8")
    return MAGIC + struct.pack(">I", len(head)) + head + b"\x00" * 300 + b"\x01" * 64


def header_with(field: str, value: str) -> str:
    fields = {"v": "1", "run": '"run-t"', "round": "2", "site": '"neurology"',
              "issued": str(NOW), "nonce": '"ab"', "kem": '"x25519"',
              "ciphertext_bytes": "300", "metrics": '{"num-examples": 5}', "tensors": "[]"}
    fields[field] = value
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


def signed(payload: bytes, tensors: list[list[object]], site: str = "neurology",
           examples: float = 40.0) -> bytes:
    """An envelope an enrolled site makes by hand: any payload, any manifest, signed."""
    server = SERVER.public()
    head = json.dumps({"v": 1, "run": "run-t", "round": 2, "site": site, "issued": NOW,
                       "nonce": os.urandom(8).hex(), "kem": server.kem,
                       "ciphertext_bytes": 32 + len(payload) + 16,
                       "metrics": {"num-examples": examples}, "tensors": tensors},
                      sort_keys=True, separators=(",", ":")).encode()
    body = MAGIC + struct.pack(">I", len(head)) + head + server.encrypt(payload, INFO + head)
    return body + KEYS[site].sign(body)


def deep_safetensors() -> bytes:
    head = b'{"a":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    return struct.pack("<Q", len(head)) + head


STRUCTURED: dict[str, tuple[Callable[[], bytes], str]] = {
    "no key: round of 400 digits": (lambda: unsigned(header_with("round", "9" * 400)),
                                    "malformed"),
    "no key: header nested 20,000 deep": (
        lambda: unsigned(header_with("metrics", "[" * 20_000 + "]" * 20_000)), "malformed"),
    "no key: issued 1e999": (lambda: unsigned(header_with("issued", "1e999")), "malformed"),
    "no key: NaN literal": (lambda: unsigned(header_with("metrics", '{"num-examples": NaN}')),
                            "malformed"),
    "no key: example count of 300 digits": (
        lambda: unsigned(header_with("metrics", '{"num-examples": ' + "9" * 300 + "}")),
        "malformed"),
    "no key: lone surrogate site": (lambda: unsigned(header_with("site", '"\\ud800"')),
                                    "malformed"),
    "no key: lookalike site name": (lambda: unsigned(header_with("site", '"neur\\u043elogy"')),
                                    "unknown-site"),
    "no key: site name with a trailing newline": (
        lambda: unsigned(header_with("site", '"neurology\\n"')), "unknown-site"),
    "enrolled: decrypted safetensors header nested 20,000 deep": (
        lambda: signed(deep_safetensors(), []), "malformed"),
    "enrolled: values of magnitude 1e7": (
        lambda: envelope({A: CURRENT[A] + 1e7, B: CURRENT[B]}), "norm-bound"),
}


@pytest.mark.parametrize("case", list(STRUCTURED))
def test_a_structured_hostile_envelope_is_refused_and_the_round_goes_on(tmp_path: Path,
                                                                        case: str) -> None:
    make, reason = STRUCTURED[case]
    _, row, new = run_round(tmp_path, make())
    assert row["sites-refused"] == 1 and row[f"refused/{reason}"] == 1, row
    assert row["sites-trained"] == 3 and new is not None
    for k, v in honest_mean().items():
        assert torch.allclose(new[k], v, atol=1e-6)


def odd_replies(sent: Message) -> dict[str, Message]:
    """Replies that are not the fourth site's update at all."""
    return {
        "no envelope record": Message(RecordDict({
            "metrics": MetricRecord({"num-examples": 1})}), reply_to=sent),
        "envelope that is text": Message(RecordDict({
            "metrics": MetricRecord({"num-examples": 1}),
            wire.ENVELOPE: ConfigRecord({wire.ENVELOPE_BYTES: "not bytes"})}), reply_to=sent),
        "envelope that is a list": Message(RecordDict({
            "metrics": MetricRecord({"num-examples": 1}),
            wire.ENVELOPE: ConfigRecord({wire.ENVELOPE_BYTES: [1, 2, 3]})}), reply_to=sent),
        "nothing at all": Message(RecordDict({}), reply_to=sent),
    }


@pytest.mark.parametrize("case", ["no envelope record", "envelope that is text",
                                  "envelope that is a list", "nothing at all"])
def test_a_reply_without_a_readable_update_is_refused_and_the_round_goes_on(
        tmp_path: Path, case: str) -> None:
    _, row, new = run_round(tmp_path, b"", reply=lambda sent: odd_replies(sent)[case])
    assert row["sites-refused"] == 1 and row["refused/malformed"] == 1, row
    assert new is not None
    for k, v in honest_mean().items():
        assert torch.allclose(new[k], v, atol=1e-6)


# --- Self-reported weights ---------------------------------------------------------------

def test_two_sites_claiming_extreme_example_counts_stay_within_the_stated_bound(
        tmp_path: Path) -> None:
    """Three honest sites (10, 20, 30 examples) and two enrolled liars (1e18 and 1e15
    examples, the largest a header may carry). The median count is then 30, the cap
    c x 30 = 120 (c = max_weight_ratio = 4), so the liars' share of the aggregate is at most
    s = 2 x 120 / (2 x 120 + 60) = 0.8 and the aggregate lies within s x the farthest liar's
    distance of the honest mean: the bound docs/security.md states."""
    liar = shifted(3.0)  # within the norm checks: 3x an honest change
    names = [*NAMES[:3], "neurology", "oncology2"]
    keys = dict(KEYS, oncology2=SiteKey.generate("oncology2"))
    trust = TrustStore({n: k.public() for n, k in keys.items()})
    counts = [*EXAMPLES, 1e18, 1e15]
    sealed = [envelope(s, NAMES[i], examples=EXAMPLES[i]) for i, s in enumerate(HONEST)]
    sealed += [envelope(liar, "neurology", examples=1e18),
               envelope(liar, "oncology2", key=keys["oncology2"], examples=1e15)]
    _, row, new = run_round(tmp_path, b"", names=names, trust=trust, sealed=sealed)
    assert row["sites-trained"] == 5 and row["sites-refused"] == 0
    assert new is not None
    honest = honest_mean()
    distance = _distance(new, honest)
    share = 2 * 120 / (2 * 120 + sum(EXAMPLES))
    assert distance <= share * _distance(liar, honest) + 1e-6
    # exactly the capped weighted mean: 10, 20, 30, 120, 120
    weights = [*EXAMPLES, 120.0, 120.0]
    states = [*HONEST, liar, liar]
    expected = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / sum(weights)
                for k in CURRENT}
    assert _distance(new, expected) < 1e-5
    assert row["weight-max-share"] == pytest.approx(120 / 300)
    assert max(counts) / sum(counts) > 0.99  # what the liar would have had uncapped


def test_equal_weighting_gives_every_admitted_site_the_same_share(tmp_path: Path) -> None:
    sealed = [envelope(s, NAMES[i], examples=EXAMPLES[i]) for i, s in enumerate(HONEST)]
    sealed.append(envelope(HONEST[0], examples=1e18))
    _, row, new = run_round(tmp_path, b"", sealed=sealed, federation={"weighting": "equal"})
    assert new is not None and row["weight-max-share"] == 0.25
    expected = {k: (sum(s[k] for s in HONEST) + HONEST[0][k]) / 4 for k in CURRENT}
    assert _distance(new, expected) < 1e-6


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def test_ffa_refuses_an_update_that_changed_the_frozen_a(tmp_path: Path) -> None:
    changed = {A: HONEST[0][A], B: HONEST[0][B]}
    same_a = [{A: CURRENT[A], B: s[B]} for s in HONEST]
    sealed = [envelope(s, NAMES[i], examples=EXAMPLES[i]) for i, s in enumerate(same_a)]
    sealed.append(envelope(changed))
    _, row, new = run_round(tmp_path, b"", sealed=sealed, federation={"aggregation": "ffa"})
    assert row["refused/frozen-changed"] == 1 and row["sites-trained"] == 3
    assert new is not None and torch.equal(new[A], CURRENT[A])


# --- Evaluation replies ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"site": 1e300, "heldout-loss": 1.0, "heldout-tokens": 10.0},
    {"site": 0.5, "heldout-loss": 1.0, "heldout-tokens": 10.0},
    {"site": 3.0, "heldout-loss": float("nan"), "heldout-tokens": 10.0},
    {"site": 3.0, "heldout-loss": 1.0, "heldout-tokens": 0.0},
    {"site": 3.0, "heldout-loss": 1.0},
    {"site": 0.0, "heldout-loss": 9.0, "heldout-tokens": 10.0},  # site 0 reported already
])
def test_a_hostile_evaluation_is_refused_and_the_others_are_pooled(
        bad: dict[str, float]) -> None:
    from fed_llama.server.evaluation import evaluation_report, evaluation_row

    honest = [{"site": float(i), "heldout-loss": 1.0 + i, "heldout-tokens": 10.0}
              for i in range(3)]
    replies = [Message(RecordDict({"metrics": MetricRecord(m)}), dst_node_id=1,
                       message_type="evaluate") for m in [*honest, bad]]
    reports: list[dict[str, float]] = []
    refused = []
    for reply in replies:
        try:
            reports.append(evaluation_report(reply, 4, reports))
        except Refused as exc:
            refused.append(exc.reason)
    assert len(refused) == 1 and len(reports) == 3
    row = evaluation_row(reports, NAMES)
    assert row["pooled-loss"] == pytest.approx((1.0 + 2.0 + 3.0) / 3)
