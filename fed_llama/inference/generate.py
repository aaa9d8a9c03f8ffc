"""PyTorch text generation with the chat template, streamed as it is produced."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from fed_llama.errors import ConfigError


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Refuse sampling settings that cannot work, naming the flag."""
    problems = []
    if temperature < 0:
        problems.append(f"--temperature must be 0 (greedy) or more; got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1]; got {top_p}")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    if problems:
        raise ConfigError("; ".join(problems))


def stream_chat(model: Any, tokenizer: Any, messages: list[dict[str, str]], *,
                max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                seed: int = 0) -> Iterator[str]:
    """Yield the assistant's reply to ``messages`` piece by piece; stops at end of turn.

    ``temperature`` 0 is greedy decoding; otherwise sampling with ``top_p`` nucleus filtering.
    """
    import torch
    from transformers import TextIteratorStreamer

    check_sampling(temperature, top_p, max_new_tokens)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
    kwargs = dict(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                  max_new_tokens=max_new_tokens, streamer=streamer,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  **sampling)
    errors: list[BaseException] = []

    def work() -> None:
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
