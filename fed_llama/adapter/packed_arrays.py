"""An adapter's arrays as one array on the wire, and back.

On Flower's Deployment Engine each array of a message is two objects (the array and its chunk)
that the ServerApp pushes to the SuperLink, the SuperNode pulls from it and the ClientApp pulls
from the SuperNode, one request each. An adapter has hundreds of tensors (SmolLM2's LoRA on
q, k, v and o: 240), and a ClientApp that asks for an object not yet there waits Flower's
back-off (1 s, doubling, up to 10 s) before asking again. Packed, the adapter is one array of
bytes and a layout (names, dtypes, shapes): a handful of objects, the same bytes.

:func:`pack` and :func:`unpack` are exact inverses; :func:`unpack` is total on what arrives
(its value, or a :class:`~fed_llama.crypto.refusal.Refused` ``malformed`` saying what is
wrong). numpy only: no torch, no Flower transport.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fed_llama import wire
from fed_llama.crypto.refusal import Refused

PACKED = "packed"
"""The one array of a packed record: every array's bytes, in the layout's order."""
NAMES, DTYPES, NDIMS, DIMS = "names", "dtypes", "ndims", "dims"
"""The layout's keys: each array's name, numpy dtype string and number of dimensions, and
every array's dimensions one after another."""

DTYPES_ALLOWED = frozenset({"<f4", "<f2", "<f8", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"})
"""The dtypes a packed record may hold (an adapter's, and the integer codes of a compressed
update)."""
MAX_NDIM = 8


def pack(record: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord]:
    """``record`` as one byte array and its layout."""
    names: list[str] = []
    dtypes: list[str] = []
    ndims: list[int] = []
    dims: list[int] = []
    parts: list[bytes] = []
    for name, array in record.items():
        values = array.numpy()
        names.append(name)
        dtypes.append(values.dtype.str)
        ndims.append(values.ndim)
        dims.extend(int(d) for d in values.shape)
        parts.append(values.tobytes(order="C"))
    buffer = np.frombuffer(b"".join(parts), dtype=np.uint8)
    layout = ConfigRecord({NAMES: names, DTYPES: dtypes, NDIMS: ndims, DIMS: dims})
    return ArrayRecord({PACKED: Array(buffer)}), layout


def unpack(record: ArrayRecord, layout: ConfigRecord) -> ArrayRecord:
    """The record :func:`pack` made ``record`` and ``layout`` from; refused (``malformed``)
    when they do not fit together."""
    names, dtypes, ndims, dims = (_list(layout, key, kind) for key, kind in
                                  ((NAMES, str), (DTYPES, str), (NDIMS, int), (DIMS, int)))
    if not len(names) == len(dtypes) == len(ndims):
        _refuse(f"{len(names)} names, {len(dtypes)} dtypes and {len(ndims)} ranks")
    if len(set(names)) != len(names) or not all(names):
        _refuse("the array names are not unique and non-empty")
    if any(d not in DTYPES_ALLOWED for d in dtypes):
        _refuse(f"a dtype outside {sorted(DTYPES_ALLOWED)}")
    if any(not 0 <= n <= MAX_NDIM for n in ndims) or sum(ndims) != len(dims) \
            or any(d < 0 for d in dims):
        _refuse("the shapes do not fit the ranks")
    if list(record.keys()) != [PACKED]:
        _refuse(f"the record holds {sorted(record.keys())}, not one {PACKED!r} array")
    try:
        buffer = record[PACKED].numpy()
    except Exception as exc:  # numpy's reader of the array's bytes: any failure is a refusal
        _refuse(f"the packed array cannot be read ({type(exc).__name__})")
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        _refuse(f"the packed array is {buffer.dtype} of rank {buffer.ndim}, not bytes")
    shapes, at = [], 0
    for n in ndims:
        shapes.append(tuple(dims[at:at + n]))
        at += n
    sizes = [math.prod(s) * np.dtype(d).itemsize for s, d in zip(shapes, dtypes, strict=True)]
    if sum(sizes) != buffer.size:
        _refuse(f"the layout describes {sum(sizes)} bytes, the array holds {buffer.size}")
    out, offset = {}, 0
    for name, dtype, shape, size in zip(names, dtypes, shapes, sizes, strict=True):
        values = np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=offset)
        out[name] = Array(values.reshape(shape))
        offset += size
    return ArrayRecord(out)


def packed_content(content: RecordDict) -> RecordDict:
    """A message's content with its ARRAYS record packed (and the ARRAYS_LAYOUT record added);
    ``content`` itself where it has no ARRAYS record or is packed already. A new RecordDict:
    Flower's strategies give every message of a round the same one."""
    record = content.array_records.get(wire.ARRAYS)
    if record is None or wire.ARRAYS_LAYOUT in content.config_records:
        return content
    arrays, layout = pack(record)
    return RecordDict({**dict(content.items()), wire.ARRAYS: arrays,
                       wire.ARRAYS_LAYOUT: layout})


def unpacked_content(content: RecordDict) -> RecordDict:
    """The inverse of :func:`packed_content`: ``content`` itself where it is not packed;
    refused (``malformed``) where its layout does not fit its arrays."""
    layout = content.config_records.get(wire.ARRAYS_LAYOUT)
    if layout is None:
        return content
    arrays = unpack(content.array_records.get(wire.ARRAYS, ArrayRecord()), layout)
    rest = {k: v for k, v in content.items() if k != wire.ARRAYS_LAYOUT}
    return RecordDict({**rest, wire.ARRAYS: arrays})


def _list(layout: ConfigRecord, key: str, kind: type) -> list[Any]:
    value = layout.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(v) is kind for v in value):
        _refuse(f"the layout's {key!r} is not a list of {kind.__name__}")
    return value


def _refuse(detail: str) -> NoReturn:
    raise Refused("malformed", f"packed arrays: {detail}")
