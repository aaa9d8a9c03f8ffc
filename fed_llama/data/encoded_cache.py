"""A site's encoded data kept on disk, so a fresh process does not read and tokenize it again.

On Flower's Deployment Engine every message to a site starts a new ClientApp process, and
reading the site's records and rendering each through the chat template took seconds of
every message. The first process to encode a site's data writes it here; the next ones read
it back in a fraction of a second.

An entry is named by :func:`cache_key` of everything the encoded data depends on (the data
settings, the seed, the hashes of the data and tokenizer files, this package's data code and
the tokenizer library's version), so a change to any of them is a different entry, never a
stale one. :func:`read` is total: a missing, unreadable, truncated or foreign file is a miss
(the caller encodes again), never an error or a wrong value. Entries hold a site's private
records: they are written readable by their owner only, in the site's own cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fed_llama.common.files import write_text_atomic
from fed_llama.data.records import parse_record
from fed_llama.data.source import SiteData
from fed_llama.data.tokenize import Encoded

log = logging.getLogger(__name__)

FORMAT = 1
"""The entry layout; bump it when :func:`write`'s output changes."""
MAX_ENTRIES = 32
"""Entries kept in a folder; writing one more deletes the least recently written."""


def cache_key(identity: Mapping[str, Any]) -> str:
    """The sha256 of ``identity`` (JSON-serializable) with this module's format and the code
    of :mod:`fed_llama.data`, whose change may change the encoding."""
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    text = json.dumps({"format": FORMAT, "code": code.hexdigest(), **identity},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


def write(folder: Path, key: str, data: SiteData) -> None:
    """Keep ``data`` under ``key`` (atomically, owner-only); a folder that cannot be written
    only costs the encoding next time."""
    body = {"format": FORMAT, "key": key,
            "train": [[e.input_ids, e.labels] for e in data.train],
            "heldout": [[e.input_ids, e.labels] for e in data.heldout],
            "heldout_examples": [ex.to_json() for ex in data.heldout_examples],
            "summary": data.summary}
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_text_atomic(entry_path(folder, key), json.dumps(body, separators=(",", ":")),
                          mode=0o600)
        _prune(folder)
    except (OSError, TypeError, ValueError) as exc:
        log.debug("could not keep the encoded data in %s: %s", folder, exc)


def _prune(folder: Path) -> None:
    entries = []
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError):  # another process may have removed it
            entries.append((path.stat().st_mtime_ns, path))
    for _, path in sorted(entries, reverse=True)[MAX_ENTRIES:]:
        path.unlink(missing_ok=True)


def read(folder: Path, key: str) -> SiteData | None:
    """The data kept under ``key``, or None if there is none or it is not a valid entry."""
    path = entry_path(folder, key)
    try:
        body = json.loads(path.read_bytes())
        return _site_data(body, key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        log.info("encoded data cache %s is not usable (%s): encoding again", path, exc)
        return None


def _site_data(body: Any, key: str) -> SiteData:
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("key") != key:
        raise ValueError("not an entry of this format for this key")
    summary = body["summary"]
    if not isinstance(summary, dict):
        raise ValueError("summary is not an object")
    examples = body["heldout_examples"]
    if not isinstance(examples, list):
        raise ValueError("heldout_examples is not a list")
    heldout = _encoded(body["heldout"])
    if len(examples) != len(heldout):
        raise ValueError("held-out examples and encodings differ in number")
    return SiteData(train=_encoded(body["train"]), heldout=heldout,
                    heldout_examples=[parse_record(x) for x in examples], summary=summary)


def _encoded(items: Any) -> list[Encoded]:
    if not isinstance(items, list):
        raise ValueError("encoded examples are not a list")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError("an encoded example is not [input_ids, labels]")
        ids, labels = item
        if not (isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels)
                and all(type(x) is int for x in ids) and all(type(x) is int for x in labels)):
            raise ValueError("an encoded example's ids and labels are not equal-length ints")
        out.append(Encoded(input_ids=ids, labels=labels))
    return out
