"""Compressed updates: a site's change in 8 or 4 bits per value, what rounding leaves out kept
at the site, decoded by the aggregator before its checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FakeGrid, qa_records
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fed_llama import wire
from fed_llama.adapter.compression import (
    BLOCK,
    LEVELS,
    SCALE_SUFFIX,
    compress,
    decompress,
    dequantize,
    quantize,
)
from fed_llama.client.compression import RESIDUAL, compression_mod
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.errors import ConfigError
from fed_llama.server.admission import Admission
from fed_llama.server.compression import CompressedUpdates
from fed_llama.server.round_book import RoundBook

NAMES = ["cardiology", "oncology"]
A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"
G = torch.Generator().manual_seed(11)
CURRENT = {A: torch.randn(8, 3000, generator=G), B: torch.zeros(3000, 8)}
SITES = [{k: v + 0.01 * torch.randn(v.shape, generator=G) for k, v in CURRENT.items()}
         for _ in NAMES]


@pytest.mark.parametrize(("scheme", "levels", "ratio"), [("int8", 127, 0.254),
                                                         ("int4", 7, 0.129)])
def test_each_value_is_within_half_a_step_of_its_block_and_the_bytes_shrink(
        scheme: str, levels: int, ratio: float) -> None:
    change = torch.randn(1000, generator=G) * torch.linspace(0.01, 1.0, 1000)
    codes, scales = quantize(change, scheme)
    decoded = dequantize(codes, scales, (1000,), scheme)
    steps = scales.float().repeat_interleave(BLOCK)[:1000]
    assert bool(((decoded - change).abs() <= steps / 2 + 1e-6).all())
    # a block's largest value is kept to float16's precision
    assert float((decoded - change).abs().max()) < float(change.abs().max()) / levels
    sent = codes.numel() * codes.element_size() + scales.numel() * 2
    assert sent / (4 * 1000) == pytest.approx(ratio, abs=0.01)


@pytest.mark.parametrize("magnitude", [1e-2, 1e-3, 1e-4, 1e-5])
def test_small_changes_decode_as_closely_as_large_ones_and_int8_beats_int4(
        magnitude: float) -> None:
    # a round's change is often below float16's smallest normal times 127 (7.8e-3): each
    # block's scale is stored as float16 and the codes must use the scale as stored
    change = magnitude * torch.randn(4096, generator=G)
    error = {}
    for scheme, levels in LEVELS.items():
        codes, scales = quantize(change, scheme)
        decoded = dequantize(codes, scales, (4096,), scheme)
        error[scheme] = float((decoded - change).abs().max() / change.abs().max())
        # at most half a step of the block's largest value, and a little for float16's
        # coarser subnormal scales (about 6e-8 apart) on the smallest changes
        assert error[scheme] < 0.5 / levels * 1.1 + 6e-8 / magnitude
    assert error["int8"] < error["int4"] / 5


def test_a_record_with_scales_that_are_not_finite_or_negative_is_refused() -> None:
    record, _ = compress(SITES[0], CURRENT, "int8")
    for bad in (float("nan"), float("inf"), -1.0):
        scales = record[A + SCALE_SUFFIX].clone()
        scales[0] = bad
        with pytest.raises(ValueError, match="scales must be finite"):
            decompress({**record, A + SCALE_SUFFIX: scales}, CURRENT, "int8")


@pytest.mark.parametrize("scheme", list(LEVELS))
def test_a_diverged_sites_inf_change_is_refused_not_rounded_to_a_finite_one(scheme: str
                                                                          ) -> None:
    diverged = {A: SITES[0][A].clone(), B: SITES[0][B]}
    diverged[A][0, 0] = float("inf")
    record, _ = compress(diverged, CURRENT, scheme)
    with pytest.raises(ValueError, match="scales must be finite"):
        decompress(record, CURRENT, scheme)


def test_error_feedback_keeps_the_sum_of_what_was_sent_close_to_the_sum_of_the_changes(
        ) -> None:
    # the same small change every round: without feedback int4 rounds the small values
    # of a block to 0 for ever; with it, what was sent adds up to the rounds' changes
    current = {B: torch.zeros(1, 256)}
    change = torch.cat([torch.full((1, 128), 0.001), torch.full((1, 128), 1.0)], dim=1)
    change[0, 127] = 1.0  # each block has one large value: the small ones round to 0
    sent_total, residual = torch.zeros(1, 256), None
    for _ in range(50):
        record, residual = compress({B: current[B] + change}, current, "int4", residual)
        sent_total += decompress(record, current, "int4")[B]
    assert torch.allclose(sent_total, 50 * change, atol=0.15)
    once, _ = compress({B: current[B] + change}, current, "int4")
    assert float(decompress(once, current, "int4")[B][0, :127].abs().max()) == 0.0


@pytest.mark.parametrize(("hostile", "fragment"), [
    (lambda r: {k: v for k, v in r.items() if not k.endswith(SCALE_SUFFIX)}, "missing"),
    (lambda r: {**r, "extra": torch.zeros(1)}, "unexpected"),
    (lambda r: {**r, A: r[A][:-1]}, "codes"),
    (lambda r: {**r, A: r[A].to(torch.int16)}, "codes"),
    (lambda r: {**r, A + SCALE_SUFFIX: r[A + SCALE_SUFFIX].float()}, "scales"),
    (lambda r: {**r, B + SCALE_SUFFIX: r[B + SCALE_SUFFIX][:1]}, "scales"),
])
def test_a_record_that_does_not_fit_the_adapter_is_refused_with_the_reason(
        hostile, fragment: str) -> None:  # type: ignore[no-untyped-def]
    record, _ = compress(SITES[0], CURRENT, "int8")
    with pytest.raises(ValueError, match=fragment):
        decompress(hostile(record), CURRENT, "int8")


def _scenario(**federation: object) -> ScenarioConfig:
    return build_config(ScenarioConfig, {"federation": {
        "sites": [f"icd10:{n}" for n in NAMES], **federation},
        "security": {"envelopes": False, "seal_rounds": False}}, source="test")


@pytest.mark.usefixtures("flower_task")
def test_the_site_mod_and_the_aggregator_wrapper_carry_compressed_changes_around_fedavg(
        ) -> None:
    scenario = _scenario(update_compression="int8")
    book = RoundBook(NAMES)
    strategy = CompressedUpdates(Admission(FedAvg(), book, scenario), book, "int8")
    sent = list(strategy.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(),
                                         FakeGrid(2)))  # type: ignore[arg-type]
    mod = compression_mod(scenario)
    replies = []
    for site, msg in enumerate(sent):
        context = Context(run_id=1, node_id=msg.metadata.dst_node_id,
                          node_config={"partition-id": site}, state=RecordDict(),
                          run_config={})

        def train(m: Message, _: Context, site: int = site) -> Message:
            metrics = MetricRecord({wire.NUM_EXAMPLES: 10 + 20 * site, wire.SITE: float(site)})
            return Message(RecordDict({wire.ARRAYS: ArrayRecord(SITES[site]),
                                       wire.METRICS: metrics}), reply_to=m)

        reply = mod(msg, context, train)
        codes = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
        assert codes[A].dtype == torch.int8 and codes[A + SCALE_SUFFIX].dtype == torch.float16
        assert RESIDUAL in context.state.array_records  # kept at the site, never sent
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    got = arrays.to_torch_state_dict()
    for key in CURRENT:
        mean = 0.25 * SITES[0][key] + 0.75 * SITES[1][key]
        step = float((SITES[1][key] - CURRENT[key]).abs().max()) / 127
        assert torch.allclose(got[key], mean, atol=step), key
    plain = sum(v.numel() * 4 for v in CURRENT.values())
    assert all(n < 0.27 * plain for n in book.bytes_up.values())
    assert book.refused == {}
    # a reply of plain arrays where a compressed change is expected: refused, with the reason
    book2 = RoundBook(NAMES)
    strategy2 = CompressedUpdates(Admission(FedAvg(), book2, scenario), book2, "int8")
    sent2 = list(strategy2.configure_train(1, ArrayRecord(CURRENT), ConfigRecord(),
                                           FakeGrid(2)))  # type: ignore[arg-type]
    plain_reply = Message(RecordDict({wire.ARRAYS: ArrayRecord(SITES[0]), wire.METRICS:
                                      MetricRecord({wire.NUM_EXAMPLES: 10, wire.SITE: 0.0})}),
                          reply_to=sent2[0])
    strategy2.aggregate_train(1, [plain_reply])
    assert list(book2.refused.values()) == ["malformed"]


def test_compression_is_refused_where_it_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="update_compression") as err:
        build_config(ScenarioConfig, {"federation": {
            "sites": ["icd10:cardiology", "icd10:oncology", "icd10:psychiatry"],
            "update_compression": "int4"},
            "secure_aggregation": {"enabled": True},
            "security": {"envelopes": False, "seal_rounds": False}}, source="test")
    assert "sum" in str(err.value)
    with pytest.raises(ConfigError, match="site_ranks"):
        build_config(ScenarioConfig, {"federation": {
            "sites": ["icd10:cardiology", "icd10:oncology"], "aggregation": "exact",
            "site_ranks": [4, 8], "update_compression": "int8"}}, source="test")


def test_a_federation_with_int4_updates_in_envelopes_admits_every_update(
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fed_llama.launch.simulate import simulate

    for i in range(2):
        write_jsonl(qa_records(16 + 4 * i), name=f"site{i}.jsonl")
    path = tmp_path / "scenario.toml"
    path.write_text(f'[backbone]\nname = "{tiny_backbone}"\n'
                    "[train]\nmax_steps = 3\nwarmup_steps = 1\nbatch_size = 4\n"
                    "[evaluation]\nquestions = 0\n"
                    '[federation]\nrounds = 2\nsites = ["site0.jsonl", "site1.jsonl"]\n'
                    'update_compression = "int4"\n')
    store = simulate(path, tmp_path / "run")
    history = json.loads((store.out / "history.json").read_text())
    assert [row["sites-trained"] for row in history] == [2, 2]
    assert all(row["sites-refused"] == 0 for row in history)
    assert all(math.isfinite(row["pooled-perplexity"]) for row in history)
    adapter_bytes = history[0]["bytes-down"] / 2  # the global adapter, in float32
    for row in history:  # 13% of the adapter plus the envelope's header (large on this
        # tiny adapter of many small tensors); an uncompressed envelope exceeds the adapter
        assert row["bytes-up"] / 2 < 0.5 * adapter_bytes, row["bytes-up"]
