"""Compiled text of a batch of GeoJSON Features (`wsiseg.writers.geojson.GeoJSONWriter`).

One call writes every Feature of a batch into one byte buffer: no per-feature Python
strings.  Numbers are fixed-point: a value v with d decimals is written as the integer
rint(v * 10**d) with the point put back, trailing zeros after the point dropped, no
point when nothing is left after it, and no sign on zero (so the text parses back to
exactly ``np.round(v, d) + 0.0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsiseg.compiled import compiled

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def pieces(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 texts as one uint8 array and (k + 1,) int64 offsets."""
    raw = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(raw) + 1, np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return np.frombuffer(b"".join(raw), np.uint8).copy(), offsets


@compiled
def _put(buf: np.ndarray, used: int, src: np.ndarray, a: int, b: int) -> int:
    """Copy src[a:b] into buf at `used` (room checked by the caller); returns the new end."""
    for i in range(b - a):
        buf[used + i] = src[a + i]
    return used + b - a


@compiled
def _put_byte(buf: np.ndarray, used: int, byte: int) -> int:
    buf[used] = byte
    return used + 1


#: float(10**d) for the decimals a number may have (exact: every one is a float64)
_POW10 = np.array([float(10**d) for d in range(19)], np.float64)


@compiled
def _put_number(buf: np.ndarray, used: int, value: float, decimals: int) -> int:
    """Write the fixed-point text of `value` with `decimals` decimals (0-18) at `used` (at most
    24 bytes; room checked by the caller), digits counted first and then written from the
    last; returns the new end."""
    v = np.int64(np.rint(value * _POW10[decimals]))
    negative = v < 0
    a = np.uint64(-v) if negative else np.uint64(v)
    ten = np.uint64(10)
    frac = decimals
    while frac > 0 and a % ten == 0:  # trailing zeros after the point are dropped
        a //= ten
        frac -= 1
    digits, rest = 1, a // ten
    while rest:
        digits += 1
        rest //= ten
    whole = max(digits - frac, 1)  # digits before the point (at least a "0")
    end = used + negative + whole + (frac + 1 if frac else 0)
    pos = end - 1
    for _ in range(frac):
        buf[pos] = 48 + a % ten
        a //= ten
        pos -= 1
    if frac:
        buf[pos] = 46  # "."
        pos -= 1
    for _ in range(whole):
        buf[pos] = 48 + a % ten
        a //= ten
        pos -= 1
    if negative:
        buf[pos] = 45  # "-"
    return end


#: the longest number text: 19 digits of an int64, a sign and a point
_NUMBER_BYTES = 24


@compiled
def feature_texts(
    uuid_raw: np.ndarray,
    coords: np.ndarray,
    ring_offsets: np.ndarray,
    geom_offsets: np.ndarray,
    class_index: np.ndarray,
    values: np.ndarray,
    decimals: np.ndarray,
    text: np.ndarray,
    text_offsets: np.ndarray,
    nucleus_geometry: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The Features of a batch, each followed by ",\n" but the last.

    uuid_raw: (n, 16) uint8 UUID bytes.  coords: (m, 2) float64 written with 2 decimals;
    ring_offsets / geom_offsets: GeoArrow offsets of the n polygons.  class_index: (n,)
    index of each feature's classification member text.  values: (n, c) float64
    measurements written with decimals[k] decimals.  text / text_offsets (`pieces`): the
    constant texts, in order: feature head, geometry head, geometry tail, nucleus geometry
    head, properties head, measurements head, feature tail, separator, c measurement
    prefixes, then the classification members.
    Returns (buffer, ends): the text, and (n,) int64 end of each feature in it.
    """
    n = uuid_raw.shape[0]
    n_meas = values.shape[1]
    buf = np.empty(max(1024, 600 * n), np.uint8)
    ends = np.empty(n, np.int64)
    hx = _HEX
    used = 0
    for f in range(n):
        # room for this feature: every constant text, the id, and each number at its longest
        n_coords = ring_offsets[geom_offsets[f + 1]] - ring_offsets[geom_offsets[f]]
        n_rings = geom_offsets[f + 1] - geom_offsets[f]
        room = text_offsets[-1] + 36 + 2 * (n_coords * (2 * _NUMBER_BYTES + 4) + 3 * n_rings) + n_meas * _NUMBER_BYTES
        if used + room > buf.shape[0]:
            grown = np.empty(max(2 * buf.shape[0], used + room), np.uint8)
            grown[:used] = buf[:used]
            buf = grown
        used = _put(buf, used, text, text_offsets[0], text_offsets[1])
        for b in range(16):
            if b == 4 or b == 6 or b == 8 or b == 10:
                used = _put_byte(buf, used, 45)  # "-"
            used = _put_byte(buf, used, hx[uuid_raw[f, b] >> 4])
            used = _put_byte(buf, used, hx[uuid_raw[f, b] & 15])
        for copy in range(2 if nucleus_geometry else 1):
            head = 1 if copy == 0 else 3
            used = _put(buf, used, text, text_offsets[head], text_offsets[head + 1])
            for r in range(geom_offsets[f], geom_offsets[f + 1]):
                if r > geom_offsets[f]:
                    used = _put_byte(buf, used, 44)  # ","
                used = _put_byte(buf, used, 91)  # "["
                for p in range(ring_offsets[r], ring_offsets[r + 1]):
                    if p > ring_offsets[r]:
                        used = _put_byte(buf, used, 44)
                    used = _put_byte(buf, used, 91)
                    used = _put_number(buf, used, coords[p, 0], 2)
                    used = _put_byte(buf, used, 44)
                    used = _put_number(buf, used, coords[p, 1], 2)
                    used = _put_byte(buf, used, 93)  # "]"
                used = _put_byte(buf, used, 93)
            used = _put(buf, used, text, text_offsets[2], text_offsets[3])
        used = _put(buf, used, text, text_offsets[4], text_offsets[5])
        c = 8 + n_meas + class_index[f]
        used = _put(buf, used, text, text_offsets[c], text_offsets[c + 1])
        used = _put(buf, used, text, text_offsets[5], text_offsets[6])
        for m in range(n_meas):
            used = _put(buf, used, text, text_offsets[8 + m], text_offsets[9 + m])
            used = _put_number(buf, used, values[f, m], decimals[m])
        used = _put(buf, used, text, text_offsets[6], text_offsets[7])
        ends[f] = used
        if f + 1 < n:
            used = _put(buf, used, text, text_offsets[7], text_offsets[8])
    return buf[:used], ends
