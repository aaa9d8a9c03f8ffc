"""Public keys that must never be enrolled or loaded: small-order and non-canonical points.

``cryptography`` (like OpenSSL) accepts any 32 bytes as an Ed25519 or X25519 public key. Some
of them are dangerous:

* An Ed25519 key of small order (the identity point, the point of order 2, ...) verifies
  signatures nobody made: with ``A`` the identity, ``R`` the identity and ``S = 0`` every
  message "verifies". A key with a small-order component (``A + T``, ``T`` of order 2, 4 or
  8) is not one that key generation makes either. A key must decode canonically (``y < p``,
  no negative zero) and lie in the prime-order subgroup: ``L·A`` is the identity and ``A``
  is not.
* An X25519 key of low order (u = 0, 1, p - 1 and the two points of order 8) makes the
  shared secret all zeros whatever the private key; a non-canonical encoding (u >= p, or the
  unused top bit set) names a point under a second spelling. Low order is detected by
  OpenSSL itself: an exchange with such a key fails.

Each check raises :class:`~fed_llama.crypto.refusal.Refused` (``bad-key``) with the reason.
Pure integer arithmetic on edwards25519 (RFC 8032, section 5.1), a few milliseconds a key.
"""

from __future__ import annotations

from fed_llama.crypto.refusal import Refused

_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_L = 2**252 + 27742317777372353535851937790883648493
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

Point = tuple[int, int, int, int]
"""Extended homogeneous coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, xy = T/Z."""
_IDENTITY: Point = (0, 1, 1, 0)


def _add(a: Point, b: Point) -> Point:
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa = (y1 - x1) * (y2 - x2) % _P
    bb = (y1 + x1) * (y2 + x2) % _P
    cc = t1 * 2 * _D * t2 % _P
    dd = z1 * 2 * z2 % _P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _times(k: int, point: Point) -> Point:
    out = _IDENTITY
    while k:
        if k & 1:
            out = _add(out, point)
        point = _add(point, point)
        k >>= 1
    return out


def _is_identity(point: Point) -> bool:
    x, y, z, _ = point
    return x % _P == 0 and (y - z) % _P == 0


def _decode(raw: bytes, who: str) -> Point:
    value = int.from_bytes(raw, "little")
    sign, y = value >> 255, value & ((1 << 255) - 1)
    if y >= _P:
        raise Refused("bad-key", f"{who}: a non-canonical Ed25519 encoding (y >= p)")
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x2 = u * pow(v, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        raise Refused("bad-key", f"{who}: the Ed25519 key is not a point of the curve")
    if x == 0 and sign:
        raise Refused("bad-key", f"{who}: a non-canonical Ed25519 encoding (negative zero)")
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def check_ed25519_public(raw: bytes, who: str) -> bytes:
    """``raw`` if it is a canonical Ed25519 public key of the prime-order subgroup."""
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise Refused("bad-key", f"{who}: an Ed25519 public key is 32 bytes")
    point = _decode(raw, who)
    if _is_identity(_times(8, point)):
        raise Refused("bad-key", f"{who}: a small-order Ed25519 key (it would verify forged "
                      "signatures): make a new key with `fed-llama keys`")
    if not _is_identity(_times(_L, point)):
        raise Refused("bad-key", f"{who}: the Ed25519 key has a small-order component; no "
                      "key generation makes one: make a new key with `fed-llama keys`")
    return raw


def check_x25519_public(raw: bytes, who: str) -> bytes:
    """``raw`` if it is a canonical X25519 public key of more than small order."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    if not isinstance(raw, bytes) or len(raw) != 32:
        raise Refused("bad-key", f"{who}: an X25519 public key is 32 bytes")
    if raw[31] & 0x80 or int.from_bytes(raw, "little") >= _P:
        raise Refused("bad-key", f"{who}: a non-canonical X25519 encoding (u >= p or the top "
                      "bit set)")
    try:
        x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise Refused("bad-key", f"{who}: a low-order X25519 key (every shared secret would be "
                      "zero): make a new key with `fed-llama keys`") from None
    return raw
