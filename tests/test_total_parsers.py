"""Every parser of bytes from the network or a file is total: the value or its refusal.

Structured hostile values (integers of hundreds of digits, ``1e999``, the ``NaN`` and
``Infinity`` literals, nesting thousands deep, lone UTF-16 surrogates, lookalike and
control characters in names) are put in each field of each format (the update envelope's
header, the decrypted update's safetensors header, round seals, key files, the trust store,
adapter manifests, the run history and run id, the layout of packed arrays), and random bytes
are fed to each reader. Only the parser's own refusal may come out, in bounded time.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fed_llama.adapter.packed_arrays import DIMS, DTYPES, NAMES, NDIMS, PACKED, unpack
from fed_llama.adapter.store import MANIFEST, read_manifest
from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.crypto import (
    EnvelopeHeader,
    ReplayGuard,
    RoundSeal,
    ServerKey,
    ServerPublicKey,
    SiteKey,
    SitePublicKey,
    TrustStore,
    open_envelope,
    safetensors_manifest,
)
from fed_llama.crypto.envelope import MAGIC
from fed_llama.crypto.refusal import Refused
from fed_llama.errors import AdapterError, ConfigError
from fed_llama.server.checkpoint import RunStore

SERVER = ServerKey.generate()
SITE = SiteKey.generate("cardiology")
TRUST = TrustStore({"cardiology": SITE.public()})

HOSTILE_ATOMS = [
    "1" + "0" * 400, "-" + "9" * 300, "1e999", "-1e999", "1e-999", "NaN", "Infinity",
    "-Infinity", '"\\ud800"', '"x\\udfff"', '"cardiology\\n"', '"c\\u0430rdiology"',
    '"\\uff43ardiology"', '"\\u0000"', '"cardiology\\u202e"', "0.1", "-0", "true", "null",
    "[]", "{}", '"x"', "123456789012345678901234567890", "1.5e308", "4.9e-324",
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, '"' + "A" * 5000 + '"',
]
atoms = st.sampled_from(HOSTILE_ATOMS)

HEADER = {"v": "1", "run": '"run-t"', "round": "2", "site": '"cardiology"',
          "issued": "1800000000.0", "nonce": '"00"', "kem": '"x25519"',
          "ciphertext_bytes": "100", "metrics": '{"num-examples":10}',
          "tensors": '[["a","F32",[2,2],"00"]]'}
TENSOR = {"dtype": '"F32"', "shape": "[1]", "data_offsets": "[0,4]"}
SEAL = {"run": '"run-t"', "round": "2", "adapter_sha256": '"' + "a" * 64 + '"',
        "prev": '"' + "0" * 64 + '"', "signature": '"' + "A" * 86 + '=="'}
SITE_PUB = {"kind": '"fed-llama-site-public-key"', "site": '"cardiology"',
            "ed25519": '"' + "A" * 43 + '="'}
SERVER_PUB = {"kind": '"fed-llama-server-public-key"', "kem": '"x25519"',
              "hpke": '{"x25519":"' + "A" * 43 + '="}', "ed25519": '"' + "A" * 43 + '="'}
TRUST_FILE = {"kind": '"fed-llama-trust-store"', "sites": '{"cardiology":"' + "A" * 43 + '="}'}
MANIFEST_FILE = {"format_version": "1", "files": '{"adapter_config.json":"00"}',
                 "backbone": '{"sha256":"00"}', "system_prompt": '"Be brief."'}


def render(template: dict[str, str], field: str, value: str) -> str:
    """``template`` as JSON text with ``field``'s value replaced by the raw text ``value``."""
    return "{" + ",".join(f"{json.dumps(k)}:{value if k == field else v}"
                          for k, v in template.items()) + "}"


def fields_and_atoms(template: dict[str, str]) -> st.SearchStrategy[tuple[str, str]]:
    return st.tuples(st.sampled_from(sorted(template)), atoms)


def envelope_with_header(head: bytes) -> bytes:
    return MAGIC + struct.pack(">I", len(head)) + head + b"\x00" * 200


def open_(data: bytes) -> None:
    open_envelope(data, server_key=SERVER, trust=TRUST, run="run-t", server_round=2,
                  guard=ReplayGuard(), max_bytes=1 << 22, clock=lambda: 1_800_000_000.0)


def only_refused(call: Callable[[], object], *allowed: type[Exception]) -> None:
    """``call`` returns or raises one of ``allowed`` (the parser's refusal), nothing else."""
    with contextlib.suppress(*(allowed or (Refused,))):
        call()


@settings(max_examples=400, deadline=None)
@given(fields_and_atoms(HEADER))
def test_the_envelope_header_refuses_every_structured_hostile_value(case: tuple[str, str]
                                                                     ) -> None:
    head = render(HEADER, *case).encode("utf-8")
    only_refused(lambda: EnvelopeHeader.decode(head))
    with pytest.raises(Refused):  # never reaches decryption with these bytes
        open_(envelope_with_header(head))


@settings(max_examples=200, deadline=None)
@given(fields_and_atoms(TENSOR))
def test_the_decrypted_safetensors_header_refuses_every_hostile_value(case: tuple[str, str]
                                                                       ) -> None:
    head = ('{"t":' + render(TENSOR, *case) + "}").encode("utf-8")
    only_refused(lambda: safetensors_manifest(struct.pack("<Q", len(head)) + head + b"\0" * 4))


@settings(max_examples=200, deadline=None)
@given(fields_and_atoms(SEAL))
def test_a_round_seal_refuses_every_hostile_value(case: tuple[str, str]) -> None:
    text = render(SEAL, *case)
    with pytest.raises(Refused) as err:
        seal = RoundSeal.parse(text)
        from fed_llama.crypto import verify_round

        verify_round(seal, SERVER.public(), run="run-t", server_round=2,
                     adapter_sha256="a" * 64)
    assert err.value.reason == "bad-seal"


KEY_READERS: dict[str, tuple[dict[str, str], Callable[[Path], object]]] = {
    "site public key": (SITE_PUB, SitePublicKey.load),
    "server public key": (SERVER_PUB, ServerPublicKey.load),
    "trust store": (TRUST_FILE, TrustStore.load),
    "site private key": ({"kind": '"fed-llama-site-key"', "site": '"cardiology"',
                          "ed25519": '"-----BEGIN PRIVATE KEY-----"'}, SiteKey.load),
    "server private key": ({"kind": '"fed-llama-server-key"', "kem": '"x25519"',
                            "keys": '{"x25519":"x","ed25519":"y"}'}, ServerKey.load),
}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(KEY_READERS)), st.data())
def test_key_files_and_the_trust_store_refuse_every_hostile_value(
        tmp_path: Path, reader: str, data: st.DataObject) -> None:
    template, load = KEY_READERS[reader]
    field, value = data.draw(fields_and_atoms(template))
    path = tmp_path / "file.json"
    path.write_text(render(template, field, value), encoding="utf-8")
    try:
        load(path)  # an empty trust store is one; every other case here is refused
    except Refused as exc:
        assert exc.reason == "bad-key"
    else:
        assert (reader, value) == ("trust store", "{}")


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields_and_atoms(MANIFEST_FILE))
def test_an_adapter_manifest_refuses_every_hostile_value(tmp_path: Path,
                                                         case: tuple[str, str]) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes(b"{}")
    (folder / MANIFEST).write_text(render(MANIFEST_FILE, *case))
    only_refused(lambda: read_manifest(folder), AdapterError)


def test_a_manifest_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(b"{}")
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {"/dev/zero": "00"}}))
    with pytest.raises(AdapterError, match="lists files other than"):
        read_manifest(tmp_path)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(atoms)
def test_the_run_history_and_run_id_refuse_every_hostile_value(tmp_path: Path,
                                                              value: str) -> None:
    store = RunStore(tmp_path)
    store.history_path.write_text(f'[{{"round": {value}}}]')
    only_refused(store.completed_rounds, ConfigError)
    store.history_path.write_text(value)
    only_refused(store.completed_rounds, ConfigError)
    (tmp_path / "run-id").write_text(value)
    with pytest.raises(ConfigError, match="not a run id"):
        store.run_id()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_every_reader_only_refuses_random_bytes(data: bytes) -> None:
    only_refused(lambda: EnvelopeHeader.decode(data))
    only_refused(lambda: RoundSeal.parse(data))
    only_refused(lambda: safetensors_manifest(struct.pack("<Q", len(data)) + data))
    only_refused(lambda: loads(data), BadJson)


small_ints = st.integers(min_value=-(1 << 62), max_value=1 << 62) | st.integers(-3, 12)
layouts = st.fixed_dictionaries({
    NAMES: st.lists(st.sampled_from(["a", "b", "", "a\u0000"]), max_size=4),
    DTYPES: st.lists(st.sampled_from(["<f4", "|u1", "|b1", "O", ">f4", "<U3", ""]), max_size=4),
    NDIMS: st.lists(small_ints, max_size=4), DIMS: st.lists(small_ints, max_size=10)})


@settings(max_examples=400, deadline=None)
@given(layouts, st.binary(max_size=300), st.booleans())
def test_packed_arrays_only_refuse_a_hostile_layout_or_array(layout: dict[str, list[object]],
                                                             data: bytes, raw: bool) -> None:
    """The adapter a site receives (and a reply the aggregator unpacks): any layout, and an
    array of any bytes (as numpy's format or as the raw bytes Flower deserialised)."""
    array = (Array(dtype="uint8", shape=(len(data),), stype="numpy.ndarray", data=data) if raw
             else Array(np.frombuffer(data, dtype=np.uint8)))
    only_refused(lambda: unpack(ArrayRecord({PACKED: array}),
                                ConfigRecord(layout)))  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_key_files_only_refuse_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "key.json"
    path.write_bytes(data)
    for load in (SitePublicKey.load, ServerPublicKey.load, TrustStore.load, SiteKey.load,
                 ServerKey.load):
        with pytest.raises(Refused):
            load(path)


def test_the_bounds_are_stated_in_the_refusals() -> None:
    with pytest.raises(BadJson, match="an integer of 400 digits"):
        loads("1" + "0" * 399)
    with pytest.raises(BadJson, match="out of range"):
        loads("[1e999]")
    with pytest.raises(BadJson, match="NaN is not a JSON number"):
        loads('{"a": NaN}')
    with pytest.raises(BadJson, match="nested deeper than 32 levels"):
        loads("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BadJson, match="lone UTF-16 surrogate"):
        loads('{"site": "\\ud800"}')
    with pytest.raises(BadJson, match="appears twice"):
        loads('{"round": 1, "round": 2}')
    assert loads('{"a": [1, 2.5, "x", null, true], "b": {"c": -3}}') == {
        "a": [1, 2.5, "x", None, True], "b": {"c": -3}}
    with pytest.raises(Refused, match=r"round.*outside \[0, 2147483648\]"):
        EnvelopeHeader.decode(render(HEADER, "round", "10" * 9).encode())


def test_a_history_holding_nan_and_infinite_metrics_still_reads(tmp_path: Path) -> None:
    """The run's own history may hold NaN (a metric a site did not send) and infinity (an
    epsilon before the accountant converges): --resume must read it back."""
    store = RunStore(tmp_path)
    store.record({"round": 1, "dp-epsilon": float("inf"), "site/train-seconds": float("nan")})
    (row,) = store.history()
    assert row["dp-epsilon"] == float("inf") and row["site/train-seconds"] != 0
