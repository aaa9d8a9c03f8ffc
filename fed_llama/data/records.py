"""Site data as JSONL: read, validate line by line, normalize to chat messages.

Two record shapes are accepted, one per line:

* ``{"instruction": str, "input": str (optional), "output": str}``
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, ending with
  an assistant message.

Other keys are kept as metadata (``meta`` is the conventional one: the ICD-10 generator stores
the code and the question type there). A bad record's error names the file, the line and what
is wrong; with ``skip_bad=True`` bad lines are skipped and counted instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_llama.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One conversation: the messages, plus whatever metadata the record carried."""

    messages: tuple[dict[str, str], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> tuple[dict[str, str], ...]:
        """The messages before the final answer (what a model is asked)."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        """The final assistant message (the reference answer)."""
        return self.messages[-1]["content"]

    def with_system(self, text: str) -> Example:
        """This conversation with a system message ``text`` first, unless it has one."""
        if self.messages and self.messages[0]["role"] == "system":
            return self
        return Example(messages=({"role": "system", "content": text}, *self.messages),
                       meta=self.meta)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": list(self.messages)}
        if self.meta:
            out["meta"] = self.meta
        return out


def with_system(examples: list[Example], text: str | None) -> list[Example]:
    """``examples``, each with the system message ``text`` first unless it has one (None: as
    they are, for the chat template to add its default)."""
    return examples if text is None else [ex.with_system(text) for ex in examples]


@dataclass(frozen=True)
class ReadResult:
    """The valid examples of a file and how many lines were skipped as bad."""

    examples: list[Example]
    skipped: int


def parse_record(obj: Any) -> Example:
    """Validate one decoded JSON value; raise ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    if "messages" in obj:
        return Example(messages=_check_messages(obj["messages"]), meta=meta)
    if "instruction" in obj or "output" in obj:
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"{key!r} must be a non-empty string")
        extra = obj.get("input", "")
        if not isinstance(extra, str):
            raise ValueError("'input' must be a string")
        user = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return Example(messages=({"role": "user", "content": user},
                                 {"role": "assistant", "content": obj["output"]}), meta=meta)
    raise ValueError("needs 'instruction' and 'output', or 'messages'")


def _check_messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        raise ValueError("the last message must be a non-empty 'assistant' answer")
    if not any(m["role"] == "user" for m in out):
        raise ValueError("'messages' must contain a 'user' message")
    return tuple(out)


def read_jsonl(path: Path, *, skip_bad: bool = False) -> ReadResult:
    """Read a JSONL data file; see the module docstring for the accepted records."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"data file {str(path)!r} does not exist: check the path") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise DataError(f"data file {str(path)!r} cannot be read: {exc}") from None
    examples: list[Example] = []
    skipped = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.append(parse_record(json.loads(line)))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            reason = f"data file {str(path)!r} line {lineno}: {exc}"
            if not skip_bad:
                raise DataError(f"{reason} (fix the line, or set data.skip_bad_lines = true "
                                "to skip bad lines)") from None
            skipped += 1
            log.debug("skipping %s", reason)
    if skipped:
        log.warning("%s: skipped %d bad line(s)", path, skipped)
    if not examples:
        raise DataError(f"data file {str(path)!r} has no valid record "
                        f"({skipped} bad line(s) skipped): see the accepted formats in "
                        "docs/site-operator.md")
    return ReadResult(examples=examples, skipped=skipped)


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    """Write examples as JSONL through a temporary file; return how many were written."""
    from fed_llama.common.files import write_text_atomic

    lines = [json.dumps(ex.to_json(), ensure_ascii=False) for ex in examples]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)
