"""Render examples with the backbone's chat template; label only the answer tokens.

Labels are ``-100`` (ignored by the loss) everywhere except the assistant turns: the answer's
text and its end-of-turn marker, so the model learns both what to say and when to stop.
The answer spans are found as character ranges of the rendered text (rendering the conversation
up to each assistant turn) and mapped to tokens through the tokenizer's offsets, so no
assumption is made about how the template tokenizes at turn boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fed_llama.data.records import Example
from fed_llama.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels of one example (labels are IGNORE outside the answers)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def render(tokenizer: PreTrainedTokenizerBase, messages: Any, *, generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as text."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return str(text)


def answer_spans(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of its assistant turns."""
    msgs = example.messages
    full = render(tokenizer, msgs, generation_prompt=False)
    spans = []
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, msgs[:i], generation_prompt=True) if i else ""
        upto = (full if i == len(msgs) - 1  # the same call: render the template once
                else render(tokenizer, msgs[: i + 1], generation_prompt=False))
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                "the backbone's chat template does not render conversations incrementally, so "
                "answer tokens cannot be located; use a backbone with a ChatML-style template")
        spans.append(range(len(before), len(upto)))
    return full, spans


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> Encoded:
    """Tokenize one example, truncated to ``max_length`` tokens, with answer-only labels."""
    text, spans = answer_spans(tokenizer, example)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                    truncation=True, max_length=max_length)
    ids = list(enc["input_ids"])
    labels = [tok if any(start in span for span in spans) else IGNORE
              for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)]
    return Encoded(input_ids=ids, labels=labels)


def encode_all(tokenizer: PreTrainedTokenizerBase, examples: list[Example],
               max_length: int) -> tuple[list[Encoded], int]:
    """Encode examples; drop (and count) those whose answer was cut off entirely."""
    out, dropped = [], 0
    for ex in examples:
        item = encode(tokenizer, ex, max_length)
        if item.num_answer_tokens:
            out.append(item)
        else:
            dropped += 1
    return out, dropped
