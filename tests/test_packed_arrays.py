"""The adapter travels as one array and its layout: the same tensors arrive, in a handful of
Flower objects instead of two per tensor, and a layout that does not fit is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fed_llama import wire
from fed_llama.adapter.packed_arrays import DIMS, DTYPES, NAMES, NDIMS, PACKED, pack, unpack
from fed_llama.client.packing import packing_mod
from fed_llama.crypto.refusal import Refused
from fed_llama.server.packing import PackedArrays
from fed_llama.server.round_book import RoundBook

pytestmark = pytest.mark.usefixtures("flower_task")

G = torch.Generator().manual_seed(3)
ADAPTER = {f"base_model.model.layers.{i}.{m}_proj.lora_{ab}.weight":
           torch.randn((8, 16) if ab == "A" else (16, 8), generator=G)
           for i in range(30) for m in "qkvo" for ab in "AB"}
SITES = ["cardiology", "oncology"]


def test_pack_and_unpack_are_inverses_for_every_dtype_and_shape() -> None:
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
              "f16": np.ones((4,), np.float16), "f64": np.array(2.5),  # 0-d
              "i8": np.array([-3, 7], np.int8), "u8": np.zeros((0, 5), np.uint8),
              "i64": np.array([[1 << 40]]), "bool": np.array([True, False])}
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    packed, layout = pack(record)
    assert list(packed.keys()) == [PACKED] and layout[NAMES] == list(arrays)
    back = unpack(packed, layout)
    assert list(back.keys()) == list(arrays)
    for name, values in arrays.items():
        got = back[name].numpy()
        assert got.dtype == values.dtype and got.shape == values.shape
        assert np.array_equal(got, values), name


def test_a_packed_adapter_is_a_handful_of_flower_objects_instead_of_two_per_tensor() -> None:
    plain = ArrayRecord(ADAPTER)
    packed, layout = pack(plain)
    assert len(get_all_nested_objects(plain)) == 2 * len(ADAPTER) + 1  # array + chunk each
    assert len(get_all_nested_objects(packed)) == 3  # the record, its array and one chunk
    # the same bytes: 240 tensors of 128 floats
    assert packed[PACKED].numpy().size == 4 * sum(t.numel() for t in ADAPTER.values())
    assert len(layout[NAMES]) == len(ADAPTER) == 240


def _site(msg: Message, context: Context, seen: list[dict[str, torch.Tensor]]) -> Message:
    """A site that records what it trained on and replies the adapter plus 1."""
    state = msg.content.array_records[wire.ARRAYS].to_torch_state_dict()
    seen.append(state)
    return Message(RecordDict({
        wire.ARRAYS: ArrayRecord({k: v + 1 for k, v in state.items()}),
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10 * (len(seen)), wire.SITE: 0.0})}),
        reply_to=msg)


def test_the_wrapper_and_the_mod_carry_the_adapter_both_ways_around_flowers_fedavg() -> None:
    book = RoundBook(SITES)
    strategy = PackedArrays(FedAvg(), book)
    sent = list(strategy.configure_train(1, ArrayRecord(ADAPTER), ConfigRecord(),
                                         FakeGrid(2)))  # type: ignore[arg-type]
    assert all(list(m.content.array_records[wire.ARRAYS].keys()) == [PACKED] for m in sent)
    replies, seen = [], []
    for msg in sent:
        context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={},
                          state=RecordDict(), run_config={})
        reply = packing_mod(msg, context, lambda m, c: _site(m, c, seen))
        assert wire.ARRAYS_LAYOUT in reply.content.config_records  # packed on the way back
        replies.append(reply)
    for state in seen:  # each site got the global adapter, bit for bit
        assert state.keys() == ADAPTER.keys()
        assert all(torch.equal(state[k], ADAPTER[k]) for k in ADAPTER)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    mean = arrays.to_torch_state_dict()
    assert all(torch.allclose(mean[k], ADAPTER[k] + 1) for k in ADAPTER)
    assert book.refused == {}


def test_a_reply_whose_layout_does_not_fit_is_refused_and_the_round_goes_on() -> None:
    book = RoundBook(SITES)
    strategy = PackedArrays(FedAvg(min_train_nodes=1, min_available_nodes=1), book)
    sent = list(strategy.configure_train(1, ArrayRecord(ADAPTER), ConfigRecord(),
                                         FakeGrid(2)))  # type: ignore[arg-type]
    replies, seen = [], []
    for msg in sent:
        context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={},
                          state=RecordDict(), run_config={})
        replies.append(packing_mod(msg, context, lambda m, c: _site(m, c, seen)))
    layout = replies[1].content.config_records[wire.ARRAYS_LAYOUT]
    layout[DIMS] = [d + 1 for d in layout[DIMS]]  # type: ignore[union-attr]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None  # the other site's update
    assert book.refused == {sent[1].metadata.dst_node_id: "malformed"}


@pytest.mark.parametrize(("change", "why"), [
    ({NAMES: ["a", "a"]}, "not unique"),
    ({DTYPES: ["<f4", "O"]}, "a dtype outside"),
    ({DTYPES: ["<f4", ">f4"]}, "a dtype outside"),
    ({NDIMS: [1, 9]}, "do not fit the ranks"),
    ({DIMS: [2, -1]}, "do not fit the ranks"),
    ({DIMS: [2, 3]}, "describes 20 bytes, the array holds 16"),
    ({NAMES: ["a"]}, "1 names, 2 dtypes"),
    ({NDIMS: "1 1"}, "not a list of int"),
])
def test_unpack_refuses_a_layout_that_does_not_fit(change: dict[str, object], why: str) -> None:
    packed, layout = pack(ArrayRecord({"a": Array(np.zeros(2, np.float32)),
                                       "b": Array(np.zeros(2, np.float32))}))
    hostile = ConfigRecord({**dict(layout), **change})  # type: ignore[arg-type]
    with pytest.raises(Refused, match=why) as refused:
        unpack(packed, hostile)
    assert refused.value.reason == "malformed"


def test_unpack_refuses_a_record_that_is_not_one_byte_array() -> None:
    _, layout = pack(ArrayRecord({"a": Array(np.zeros(2, np.float32))}))
    with pytest.raises(Refused, match="not one 'packed' array"):
        unpack(ArrayRecord({"a": Array(np.zeros(8, np.uint8))}), layout)
    with pytest.raises(Refused, match="not bytes"):
        unpack(ArrayRecord({PACKED: Array(np.zeros(2, np.float32))}), layout)
    broken = Array(dtype="uint8", shape=(8,), stype="numpy.ndarray", data=b"not numpy")
    with pytest.raises(Refused, match="cannot be read"):
        unpack(ArrayRecord({PACKED: broken}), layout)
