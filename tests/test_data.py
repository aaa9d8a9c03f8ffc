"""Site data: records, answer-only labels, truncation, splits, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import qa_records

from fed_llama.backbone import load_tokenizer, resolve_backbone
from fed_llama.config import DataConfig
from fed_llama.data import IGNORE, Example, encode, read_jsonl
from fed_llama.data.batching import batch_order, collate
from fed_llama.data.source import load_site_data, seeded_split
from fed_llama.data.tokenize import encode_all
from fed_llama.errors import DataError


@pytest.fixture(scope="module")
def tok(tiny_backbone: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(resolve_backbone(str(tiny_backbone)))


def test_both_record_shapes_normalize_to_messages(write_jsonl) -> None:  # type: ignore[no-untyped-def]
    path = write_jsonl([
        {"instruction": "Name the code", "input": "hypertension", "output": "I10"},
        {"messages": [{"role": "system", "content": "Be brief"},
                      {"role": "user", "content": "Code?"},
                      {"role": "assistant", "content": "I10"}], "meta": {"code": "I10"}},
    ])
    first, second = read_jsonl(path).examples
    assert first.messages == ({"role": "user", "content": "Name the code\n\nhypertension"},
                              {"role": "assistant", "content": "I10"})
    assert second.answer == "I10" and second.meta == {"code": "I10"}


@pytest.mark.parametrize("line, reason", [
    ("{not json", "line 2: Expecting property name"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"instruction": "x"}', "line 2: 'output' must be a non-empty string"),
    ('{"instruction": "x", "output": ""}', "line 2: 'output' must be a non-empty string"),
    ('{"prompt": "x"}', "line 2: needs 'instruction' and 'output', or 'messages'"),
    ('{"messages": []}', "line 2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role must be one of"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be a non-empty"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
     "messages[0].content must be a string"),
])
def test_each_bad_record_names_its_line_and_problem(write_jsonl, line: str,  # type: ignore[no-untyped-def]
                                                     reason: str) -> None:
    path = write_jsonl([qa_records(1)[0], line])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert reason in str(err.value)
    assert str(path) in str(err.value) and "skip_bad_lines" in str(err.value)


def test_bad_lines_can_be_skipped_and_are_counted(write_jsonl) -> None:  # type: ignore[no-untyped-def]
    path = write_jsonl([qa_records(1)[0], "garbage", "", '{"a": 1}', qa_records(2)[1]])
    result = read_jsonl(path, skip_bad=True)
    assert len(result.examples) == 2 and result.skipped == 2


def test_a_file_without_any_valid_record_is_an_error(write_jsonl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="has no valid record"):
        read_jsonl(write_jsonl(["garbage"]), skip_bad=True)
    with pytest.raises(DataError, match="has no valid record"):
        read_jsonl(write_jsonl([""], name="empty.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_only_answer_tokens_carry_labels(tok) -> None:  # type: ignore[no-untyped-def]
    ex = Example(messages=({"role": "user", "content": "What does ICD-10-CM code I10 describe?"},
                           {"role": "assistant", "content": "Essential hypertension"}))
    enc = encode(tok, ex, max_length=256)
    labelled = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(labelled) == "Essential hypertension<|im_end|>\n"
    # every labelled position holds its own input token; the prompt is all IGNORE
    assert all(lab in (IGNORE, ids) for lab, ids in zip(enc.labels, enc.input_ids, strict=True))
    first = next(i for i, t in enumerate(enc.labels) if t != IGNORE)
    assert tok.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_every_assistant_turn_is_labelled_in_a_conversation(tok) -> None:  # type: ignore[no-untyped-def]
    ex = Example(messages=({"role": "user", "content": "code?"},
                           {"role": "assistant", "content": "I10"},
                           {"role": "user", "content": "and?"},
                           {"role": "assistant", "content": "I21.9"}))
    enc = encode(tok, ex, max_length=256)
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == \
        "I10<|im_end|>\nI21.9<|im_end|>\n"


def test_truncation_keeps_the_start_and_drops_answerless_examples(tok) -> None:  # type: ignore[no-untyped-def]
    ex = Example(messages=({"role": "user", "content": "hypertension " * 50},
                           {"role": "assistant", "content": "I10"}))
    assert len(encode(tok, ex, max_length=32).input_ids) == 32
    kept, dropped = encode_all(tok, [ex], max_length=32)
    assert kept == [] and dropped == 1


def test_validation_split_is_seeded_and_disjoint() -> None:
    items = [Example(messages=({"role": "user", "content": str(i)},
                               {"role": "assistant", "content": "a"})) for i in range(50)]
    train, val = seeded_split(items, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert {x.messages[0]["content"] for x in train}.isdisjoint(
        {x.messages[0]["content"] for x in val})
    assert seeded_split(items, 0.2, seed=3) == (train, val)
    assert seeded_split(items, 0.2, seed=4)[1] != val


def test_site_data_from_a_jsonl_file(tok, write_jsonl) -> None:  # type: ignore[no-untyped-def]
    path = write_jsonl([*qa_records(20), "bad line"])
    data = load_site_data(DataConfig(source=str(path), val_fraction=0.25, skip_bad_lines=True),
                          tok, seed=0)
    assert (len(data.train), len(data.heldout)) == (15, 5)
    assert data.summary["skipped_lines"] == 1


def test_length_grouped_batches_waste_less_padding() -> None:
    lengths = [5 + (i * 37) % 200 for i in range(512)]

    def padding(group: bool) -> int:
        order = batch_order(lengths, 8, seed=0, group_by_length=group)
        batches = [next(order) for _ in range(64)]  # one epoch
        assert sorted(i for b in batches for i in b) == list(range(512))
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)

    assert padding(True) < padding(False) / 5


def test_collate_pads_right_and_masks_padding(tok) -> None:  # type: ignore[no-untyped-def]
    exs = [Example(messages=({"role": "user", "content": c},
                             {"role": "assistant", "content": "I10"})) for c in ("a", "a b c d")]
    items = [encode(tok, e, 64) for e in exs]
    batch = collate(items, pad_id=tok.pad_token_id)
    short = len(items[0].input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (
        batch["input_ids"].shape[1] - short)
    assert (batch["labels"][0, short:] == IGNORE).all()
