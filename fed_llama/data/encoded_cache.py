"""A site's encoded data kept on disk, so a fresh process does not read and tokenize it again.

On Flower's Deployment Engine every message to a site starts a new ClientApp process, and
reading the site's records and rendering each through the chat template took seconds of
every message. The first process to encode a site's data writes it here; the next ones read
it back in a fraction of a second.

An entry is named by :func:`cache_key` of :func:`identity`: the data settings, the site and
its sources, the seed, the sha256 of every file read (data, held-out, ICD-10 list, tokenizer;
hashed afresh each time, never from a memo), the versions of the libraries the encoding goes
through and this package's data code. A change to any of them is another entry. :func:`read`
is total: a missing, unreadable, truncated or foreign file, or one whose content breaks what
an encoding guarantees, is a miss (the caller encodes again), never an error or a wrong value.

Entries hold a site's private records: they are readable by their owner only, the folder
carries a ``.gitignore`` of ``*``, and an entry unused for :data:`MAX_AGE_DAYS` days, or
beyond the :data:`MAX_ENTRIES` most recently used, is deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fed_llama.common.files import file_sha256, write_text_atomic
from fed_llama.config.scenario import FederationConfig
from fed_llama.config.train import DataConfig
from fed_llama.data.records import ROLES, Example
from fed_llama.data.site_examples import input_files, site_sources
from fed_llama.data.source import SiteData
from fed_llama.data.tokenize import IGNORE, Encoded
from fed_llama.errors import DataError

log = logging.getLogger(__name__)

FORMAT = 1
"""The entry layout; bump it when :func:`write`'s output changes."""
MAX_ENTRIES = 32
"""Entries kept in a folder: writing one more deletes the least recently used."""
MAX_AGE_DAYS = 14
"""An entry neither written nor read for this long is deleted at the next write."""
STALE_TEMP_SECONDS = 3600
"""A temporary file this old is a write that was killed: deleted at the next write."""


def identity(data: DataConfig, fed: FederationConfig, site: int, seed: int,
             tokenizer_files: Iterable[Path]) -> dict[str, Any] | None:
    """What site ``site``'s encoded data depends on; None where a file it reads cannot be
    read (no caching: reading the data then says what is wrong)."""
    import jinja2
    import numpy
    import tokenizers
    import transformers

    try:
        files = {str(p): file_sha256(p) for p in [*input_files(data, fed, site),
                                                  *sorted(tokenizer_files)]}
    except (OSError, DataError):
        return None
    partition = ([fed.partition, fed.num_partitions, fed.dirichlet_alpha]
                 if fed.partition == "dirichlet" else fed.partition)
    return {"data": dataclasses.asdict(data), "system": data.trained_system_prompt,
            "sources": site_sources(fed, site), "site": site, "partition": partition,
            "seed": seed, "files": files,
            "libraries": [lib.__version__ for lib in (transformers, tokenizers, jinja2, numpy)]}


@functools.cache
def _code_digest() -> str:
    """The sha256 of :mod:`fed_llama.data`'s code, read once per process."""
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    return code.hexdigest()


def cache_key(ident: dict[str, Any]) -> str:
    """The sha256 of ``ident`` with this format and the code of :mod:`fed_llama.data`."""
    text = json.dumps({"format": FORMAT, "code": _code_digest(), **ident},
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
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_text_atomic(folder / ".gitignore", "*\n")
        write_text_atomic(entry_path(folder, key), json.dumps(body, separators=(",", ":")),
                          mode=0o600)
        _prune(folder)
    except (OSError, TypeError, ValueError) as exc:
        log.debug("could not keep the encoded data in %s: %s", folder, exc)


def _prune(folder: Path) -> None:
    now = time.time()
    entries = []
    for path in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # another process may have renamed or removed it
            if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                path.unlink()
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError):
            entries.append((path.stat().st_mtime, path))
    entries.sort(reverse=True)
    for i, (mtime, path) in enumerate(entries):
        if i >= MAX_ENTRIES or now - mtime > MAX_AGE_DAYS * 86400:
            path.unlink(missing_ok=True)


def read(folder: Path, key: str) -> SiteData | None:
    """The data kept under ``key`` (marked as used), or None if there is none or it is not a
    valid entry."""
    path = entry_path(folder, key)
    try:
        data = _site_data(json.loads(path.read_bytes()), key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        log.info("encoded data cache %s is not usable (%s): encoding again", path, exc)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used: the last to be pruned
    return data


def _site_data(body: Any, key: str) -> SiteData:
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("key") != key:
        raise ValueError("not an entry of this format for this key")
    summary, examples = body["summary"], body["heldout_examples"]
    if not isinstance(summary, dict) or not isinstance(examples, list):
        raise ValueError("summary or heldout_examples has the wrong type")
    train, heldout = _encoded(body["train"]), _encoded(body["heldout"])
    if not train or not heldout or len(examples) != len(heldout):
        raise ValueError("no training or held-out example, or unmatched held-out examples")
    return SiteData(train=train, heldout=heldout,
                    heldout_examples=[_example(x) for x in examples], summary=summary)


def _encoded(items: Any) -> list[Encoded]:
    """Encodings as :func:`fed_llama.data.tokenize.encode_all` keeps them: token ids, and
    labels that are the id or IGNORE, with at least one answer token."""
    if not isinstance(items, list):
        raise ValueError("encoded examples are not a list")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError("an encoded example is not [input_ids, labels]")
        ids, labels = item
        if not (isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels)
                and all(type(x) is int and x >= 0 for x in ids)
                and all(type(y) is int and y in (x, IGNORE)
                        for x, y in zip(ids, labels, strict=True))
                and any(y != IGNORE for y in labels)):
            raise ValueError("an encoded example's ids and labels do not match")
        out.append(Encoded(input_ids=ids, labels=labels))
    return out


def _example(obj: Any) -> Example:
    """An example as :meth:`Example.to_json` wrote it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise ValueError("a held-out example has no messages")
    meta = obj.get("meta", {})
    messages = obj["messages"]
    if not isinstance(meta, dict) or not messages or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLES
            and isinstance(m["content"], str) for m in messages):
        raise ValueError("a held-out example's messages or meta are malformed")
    return Example(messages=tuple(messages), meta=meta)
