"""A site's encoded data is kept on disk: a fresh process (each Deployment-Engine message starts
one) reads it back instead of reading and tokenizing the records again, and any change to what
the encoding depends on, or any damage to the file, means encoding again, never a stale value."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import dirichlet_scenario, qa_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fed_llama.client import site as site_ops
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.data import encoded_cache
from fed_llama.data.source import SiteData
from fed_llama.data.tokenize import Encoded
from fed_llama.training import site_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FED_LLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def scenario_for(backbone: Path, source: Path, max_length: int = 256) -> ScenarioConfig:
    """Two sites; the tests read the first."""
    other = source.with_name("other.jsonl")
    other.write_text("".join(json.dumps(r) + "\n" for r in qa_records(8)))
    return build_config(ScenarioConfig, {
        "backbone": {"name": str(backbone)}, "data": {"max_length": max_length},
        "federation": {"sites": [str(source), str(other)]}}, source="test")


def fresh_process() -> None:
    """What a new ClientApp process starts with: no backbone, no data in memory."""
    site_model._CACHE.clear()


def test_a_fresh_process_reads_the_data_the_first_one_encoded(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = scenario_for(tiny_backbone, write_jsonl(qa_records(20)))
    fresh_process()
    first = site_ops.site_data(scenario, 0)
    (entry,) = cache.glob("*.json")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600  # the site's records: owner only

    fresh_process()

    def no_encoding(*_args: object) -> None:
        raise AssertionError("encoded again although the cache holds the data")

    monkeypatch.setattr(site_ops, "encode_site", no_encoding)
    again = site_ops.site_data(scenario, 0)
    assert again == first
    assert again.train and again.heldout_examples


def test_a_changed_file_or_setting_is_another_entry(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, cache: Path) -> None:
    path = write_jsonl(qa_records(20))
    fresh_process()
    before = site_ops.site_data(scenario_for(tiny_backbone, path), 0)
    path.write_text(path.read_text().replace("hypertension", "hypotension"))
    fresh_process()
    edited = site_ops.site_data(scenario_for(tiny_backbone, path), 0)
    fresh_process()
    shorter = site_ops.site_data(scenario_for(tiny_backbone, path, max_length=48), 0)
    assert len(list(cache.glob("*.json"))) == 3
    assert edited != before
    assert max(len(e.input_ids) for e in shorter.train) <= 48


def test_an_edit_that_keeps_the_size_and_the_time_is_still_seen(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, cache: Path) -> None:
    path = write_jsonl(qa_records(20))
    fresh_process()
    before = site_ops.site_data(scenario_for(tiny_backbone, path), 0)
    times = path.stat()
    text = path.read_text()
    path.write_text(text.replace("Essential", "Ezzential"))  # a same-size redaction
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    fresh_process()
    after = site_ops.site_data(scenario_for(tiny_backbone, path), 0)
    assert after != before  # the file's bytes are hashed, not its size and time


def test_every_input_of_the_encoding_is_in_the_key(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, tmp_path: Path) -> None:
    path = write_jsonl(qa_records(20))
    base = scenario_for(tiny_backbone, path)
    heldout = write_jsonl(qa_records(4), name="held.jsonl")
    tokenizer = [tiny_backbone / "tokenizer.json"]

    def key(sc: ScenarioConfig = base, site: int = 0, seed: int = 0,
            files: list[Path] = tokenizer) -> str | None:
        ident = encoded_cache.identity(sc.data, sc.federation, site, seed, files)
        return None if ident is None else encoded_cache.cache_key(ident)

    other_tokenizer = tmp_path / "tokenizer.json"
    other_tokenizer.write_text("{}")
    keys = [key(), key(site=1), key(seed=1), key(files=[other_tokenizer]),
            key(dataclasses.replace(base, data=dataclasses.replace(base.data,
                                                                   heldout=str(heldout)))),
            key(dataclasses.replace(base, data=dataclasses.replace(base.data,
                                                                   system_prompt="Be brief.")))]
    assert None not in keys and len(set(keys)) == len(keys)
    assert key() == key()
    missing = dataclasses.replace(base, data=dataclasses.replace(
        base.data, heldout=str(tmp_path / "gone.jsonl")))
    assert key(missing) is None  # not cached: reading the data says what is missing


def test_a_dirichlet_share_is_kept_too(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = dirichlet_scenario(tiny_backbone, write_jsonl)
    fresh_process()
    first = [site_ops.site_data(scenario, i) for i in range(3)]
    fresh_process()
    monkeypatch.setattr(site_ops, "encode_site", None)  # calling it would fail
    assert [site_ops.site_data(scenario, i) for i in range(3)] == first
    assert (cache / ".gitignore").read_text() == "*\n"


def test_a_damaged_entry_is_encoded_again_and_replaced(  # type: ignore[no-untyped-def]
        tiny_backbone: Path, write_jsonl, cache: Path) -> None:
    scenario = scenario_for(tiny_backbone, write_jsonl(qa_records(20)))
    fresh_process()
    first = site_ops.site_data(scenario, 0)
    (entry,) = cache.glob("*.json")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # cut short
    fresh_process()
    assert site_ops.site_data(scenario, 0) == first
    assert encoded_cache.read(cache, entry.stem) == first  # rewritten whole


def test_the_folder_keeps_the_most_recent_entries(tmp_path: Path) -> None:
    data = SiteData(train=[Encoded([1, 2], [-100, 2])], heldout=[], heldout_examples=[],
                    summary={})
    for i in range(encoded_cache.MAX_ENTRIES + 3):
        encoded_cache.write(tmp_path, f"{i:04d}", data)
    kept = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert len(kept) == encoded_cache.MAX_ENTRIES
    assert f"{encoded_cache.MAX_ENTRIES + 2:04d}" in kept


def good_entry(key: str) -> dict[str, object]:
    return {"format": encoded_cache.FORMAT, "key": key, "train": [[[1, 2], [-100, 2]]],
            "heldout": [[[3], [3]]], "summary": {"source": "x"},
            "heldout_examples": [{"messages": [{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]}]}


def test_a_valid_entry_reads_back(tmp_path: Path) -> None:
    (tmp_path / "k.json").write_text(json.dumps(good_entry("k")))
    data = encoded_cache.read(tmp_path, "k")
    assert data is not None
    assert data.train == [Encoded([1, 2], [-100, 2])]
    assert data.heldout_examples[0].answer == "a"


@pytest.mark.parametrize("field, value", [
    ("key", "another"), ("format", encoded_cache.FORMAT + 1), ("train", [[[1, 2], [2]]]),
    ("train", [[[1.0], [1]]]), ("train", [[[True], [1]]]), ("train", {"a": 1}),
    ("train", [[[1, 2], [-100, 5]]]), ("train", [[[1, 2], [-100, -100]]]), ("train", []),
    ("train", [[[-1], [-1]]]), ("heldout", []), ("summary", []),
    ("heldout_examples", [{"messages": []}]),
    ("heldout_examples", [{"messages": [{"role": "robot", "content": "a"}]}]),
])
def test_an_entry_with_a_wrong_value_is_a_miss(tmp_path: Path, field: str,
                                              value: object) -> None:
    body = good_entry("k") | {field: value}
    (tmp_path / "k.json").write_text(json.dumps(body))
    assert encoded_cache.read(tmp_path, "k") is None


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_any_bytes_are_an_entry_or_a_miss(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "k.json").write_bytes(data)
    assert encoded_cache.read(tmp_path, "k") is None


def test_the_icd10_list_is_found_without_importing_its_package() -> None:
    """simple_icd_10_cm's import parses every code (seconds in each fresh process)."""
    script = ("import sys; from fed_llama.data.icd10 import tabular_xml; "
              "assert tabular_xml().name.endswith('.xml'); "
              "assert 'simple_icd_10_cm' not in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
