"""A small, defensive UBJSON decoder (the subset XGBoost writes, and the rest of the spec).

Numeric arrays in the optimised ``[$type#count`` form become NumPy arrays in one
step. Every length is checked against the bytes that are left and nesting is
bounded, so a corrupt or hostile file raises ``ValueError`` instead of
exhausting memory or the stack.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

_MAX_DEPTH = 128

_FIXED = {
    ord("i"): (">i1", 1),
    ord("U"): (">u1", 1),
    ord("I"): (">i2", 2),
    ord("l"): (">i4", 4),
    ord("L"): (">i8", 8),
    ord("d"): (">f4", 4),
    ord("D"): (">f8", 8),
}
_INT_FORMATS = {ord("i"): ">b", ord("U"): ">B", ord("I"): ">h", ord("l"): ">i", ord("L"): ">q"}


#: Most items of a typed array of a zero-byte type (true, false, null) read:
#: their count is the only thing that bounds them.
MAX_EMPTY_ITEMS = 1 << 20


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.buf = memoryview(data).cast("B")
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"UBJSON data is truncated at byte {self.pos} (needs {n} more)")

    def byte(self) -> int:
        self._need(1)
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> memoryview:
        self._need(n)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int_of(self, marker: int) -> int:
        fmt = _INT_FORMATS.get(marker)
        if fmt is None:
            raise ValueError(f"UBJSON length must be an integer type, got marker {marker!r}")
        size = struct.calcsize(fmt)
        (v,) = struct.unpack(fmt, self.take(size))
        return int(v)

    def length(self) -> int:
        n = self.int_of(self.byte())
        if n < 0:
            raise ValueError(f"UBJSON length is negative ({n}) at byte {self.pos}")
        return n

    def string(self) -> str:
        n = self.length()
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"UBJSON string is not UTF-8: {e}") from None

    def value(self, marker: int, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError(f"UBJSON nesting is deeper than {_MAX_DEPTH}")
        if marker in _FIXED:
            dt, size = _FIXED[marker]
            v = np.frombuffer(self.take(size), dtype=dt)[0]
            return float(v) if marker in (ord("d"), ord("D")) else int(v)
        if marker == ord("S"):
            return self.string()
        if marker == ord("H"):  # high-precision number, as a string
            s = self.string()
            try:
                return float(s)
            except ValueError:
                raise ValueError(f"UBJSON high-precision number {s!r} is not a number") from None
        if marker == ord("C"):
            return chr(self.byte())
        if marker == ord("T"):
            return True
        if marker == ord("F"):
            return False
        if marker == ord("Z"):
            return None
        if marker == ord("["):
            return self.array(depth + 1)
        if marker == ord("{"):
            return self.object(depth + 1)
        raise ValueError(f"UBJSON: unknown type marker {bytes([marker])!r} at byte {self.pos - 1}")

    def _container_header(self) -> tuple[int | None, int | None]:
        typ = count = None
        if self.pos < len(self.buf) and self.buf[self.pos] == ord("$"):
            self.pos += 1
            typ = self.byte()
            if self.byte() != ord("#"):
                raise ValueError("UBJSON: a typed container must give its count ('#')")
            count = self.length()
        elif self.pos < len(self.buf) and self.buf[self.pos] == ord("#"):
            self.pos += 1
            count = self.length()
        return typ, count

    def array(self, depth: int) -> Any:
        typ, count = self._container_header()
        if count is None:
            out = []
            while True:
                m = self.byte()
                if m == ord("]"):
                    return out
                if m == ord("N"):
                    continue
                out.append(self.value(m, depth))
        if typ is not None and typ in _FIXED:
            dt, size = _FIXED[typ]
            raw = self.take(count * size)
            return np.frombuffer(raw, dtype=dt).astype(np.dtype(dt).newbyteorder("="))
        if typ is not None and typ in (ord("T"), ord("F"), ord("Z")):
            # Items of these types take no bytes: bound the count itself.
            if count > MAX_EMPTY_ITEMS:
                raise ValueError(
                    f"UBJSON array declares {count} items of a zero-byte type "
                    f"(at most {MAX_EMPTY_ITEMS} are read)"
                )
            return [self.value(typ, depth)] * count
        # Each element takes at least one byte: bound the count by what is left.
        if count > len(self.buf) - self.pos:
            raise ValueError(f"UBJSON array of {count} items is longer than the data")
        return [self.value(typ if typ is not None else self.byte(), depth) for _ in range(count)]

    def object(self, depth: int) -> dict[str, Any]:
        typ, count = self._container_header()
        out: dict[str, Any] = {}
        if count is None:
            while True:
                if self.pos < len(self.buf) and self.buf[self.pos] == ord("}"):
                    self.pos += 1
                    return out
                key = self.string()
                m = self.byte()
                if m == ord("N"):
                    m = self.byte()
                out[key] = self.value(m, depth)
        if count > len(self.buf) - self.pos:
            raise ValueError(f"UBJSON object of {count} items is longer than the data")
        for _ in range(count):
            key = self.string()
            out[key] = self.value(typ if typ is not None else self.byte(), depth)
        return out


def loads(data: bytes | bytearray | memoryview) -> Any:
    """Decode one UBJSON value; ``ValueError`` when the data is not valid UBJSON."""
    r = _Reader(data)
    v = r.value(r.byte(), 0)
    return v
