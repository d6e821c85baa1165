"""A strict, safe decoder (and encoder) for PHP `serialize()` output.

The legacy Pydio publisher sends `serialize($array)`. The subset handled here:

    N;                  null
    b:0;  b:1;          boolean
    i:-12;              integer (signed 64-bit)
    d:0.5;  d:1.0E+25;  d:INF;  d:-INF;  d:NAN;    float
    s:LEN:"...";        string: LEN is its length in UTF-8 *bytes*; the quotes are not
                        escaped, so the content may hold `"`, `;` or `}` and only LEN
                        says where it ends
    a:N:{k;v...}        array of N key/value pairs, keys `i:` or `s:`; no `;` after `}`

Objects (`O:`, `C:`, `E:`) are refused, since unserializing them is PHP's classic
injection hole, and so are references (`r:`, `R:`). Every malformed input raises
`DecodeError` naming the byte offset; for bytes input nothing else escapes `loads`.
Arrays are decoded with an explicit stack, never recursion, and nesting is capped at
`MAX_DEPTH`.

Hand-written because no well-kept PyPI library decodes PHP serialize safely: the old
`phpserialize` package has been unmaintained since 2012.
"""

import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from pydio_ws.errors import DecodeError

MAX_DEPTH = 32
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
# A number longer than this cannot be a valid length, count or 64-bit integer; the cap
# also keeps int() away from its 4300-digit ValueError.
_MAX_DIGITS = 20
# Smallest possible pair, `i:0;N;`, so a count needing more bytes than remain is a lie.
_MIN_PAIR_BYTES = 6

# Number and float syntax as PHP's own unserialize() accepts it (a leading '+' included).
_SIGNED = re.compile(rb"[+-]?[0-9]+")
_UNSIGNED = re.compile(rb"[0-9]+")
_FLOAT = re.compile(rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|NAN|-?INF")
_REFUSED = {b"O": "objects", b"C": "objects", b"E": "objects", b"r": "references", b"R": "references"}


@dataclass
class _Array:
    """An array being decoded: the pairs read so far and the key awaiting its value."""

    count: int
    items: dict = field(default_factory=dict)
    key: Any = None

    @property
    def full(self) -> bool:
        return len(self.items) == self.count

    def put(self, value) -> None:
        self.items[self.key] = value


class _Reader:
    """A cursor over the input that reads one token at a time."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def error(self, what: str, at: Optional[int] = None) -> DecodeError:
        return DecodeError(f"PHP serialize: {what} at byte {self.pos if at is None else at}")

    def expect(self, char: bytes) -> None:
        if self.data[self.pos : self.pos + 1] != char:
            raise self.error(f"expected {char.decode()!r}")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> bytes:
        found = pattern.match(self.data, self.pos)
        if found is None:
            raise self.error(f"expected {what}")
        self.pos = found.end()
        return found.group()

    def number(self, pattern: re.Pattern) -> int:
        start = self.pos
        digits = self.match(pattern, "a number")
        if len(digits.lstrip(b"+-")) > _MAX_DIGITS:
            raise self.error("number too long", start)
        return int(digits)

    def finish(self, value):
        if self.pos != len(self.data):
            raise self.error("trailing data")
        return value

    def read_value(self, depth: int):
        """Read one value; an array comes back as an empty `_Array` to be filled."""
        start = self.pos
        kind = self.data[start : start + 1]
        if not kind:
            raise self.error("unexpected end of data")
        if kind == b"N":
            self.pos += 1
            self.expect(b";")
            return None
        if kind in _REFUSED:
            refused = _REFUSED[kind]
            raise DecodeError(f"PHP serialize: {refused} are refused ({kind.decode()}: at byte {start})")
        if kind != b"a" and kind not in _SCALAR_READERS:
            raise self.error(f"unknown type {_show(kind)}")
        self.pos += 1
        self.expect(b":")
        if kind == b"a":
            return _read_array_head(self, start, depth)
        return _SCALAR_READERS[kind](self)

    def read_key(self, array: _Array):
        """Read the next key of `array`, refusing other types and duplicates."""
        start = self.pos
        kind = self.data[start : start + 1]
        if kind == b"}":
            raise self.error(f"array ends after {len(array.items)} of {array.count} elements")
        if kind not in (b"i", b"s"):
            raise self.error("array key must be an integer or a string")
        self.pos += 1
        self.expect(b":")
        key = _SCALAR_READERS[kind](self)
        if key in array.items:
            raise self.error("duplicate array key", start)
        return key

    def close(self, array: _Array) -> None:
        if self.data[self.pos : self.pos + 1] != b"}":
            raise self.error(f"array has more than its {array.count} declared elements")
        self.pos += 1


def _read_bool(reader: _Reader) -> bool:
    digit = reader.data[reader.pos : reader.pos + 1]
    if digit not in (b"0", b"1"):
        raise reader.error("expected '0' or '1'")
    reader.pos += 1
    reader.expect(b";")
    return digit == b"1"


def _read_int(reader: _Reader) -> int:
    start = reader.pos
    value = reader.number(_SIGNED)
    if not _INT_MIN <= value <= _INT_MAX:
        raise reader.error("integer out of range", start)
    reader.expect(b";")
    return value


def _read_float(reader: _Reader) -> float:
    text = reader.match(_FLOAT, "a float")
    reader.expect(b";")
    return float(text)


def _read_string(reader: _Reader) -> str:
    length = reader.number(_UNSIGNED)
    reader.expect(b":")
    reader.expect(b'"')
    start = reader.pos
    end = start + length
    if end > len(reader.data):
        raise reader.error(f"string length {length} runs past the end", len(reader.data))
    try:
        text = reader.data[start:end].decode("utf-8")
    except UnicodeDecodeError as error:
        raise reader.error("invalid UTF-8 in string", start + error.start) from None
    reader.pos = end
    reader.expect(b'"')
    reader.expect(b";")
    return text


def _read_array_head(reader: _Reader, start: int, depth: int) -> _Array:
    """Read `N:{` of an array starting at `start`, with `depth` arrays already open."""
    if depth >= MAX_DEPTH:
        raise reader.error(f"arrays nested deeper than {MAX_DEPTH}", start)
    count = reader.number(_UNSIGNED)
    reader.expect(b":")
    reader.expect(b"{")
    remaining = len(reader.data) - reader.pos
    if count and count * _MIN_PAIR_BYTES + 1 > remaining:
        raise reader.error(f"array count {count} cannot fit in the remaining {remaining} bytes", start)
    return _Array(count)


_SCALAR_READERS = {b"b": _read_bool, b"i": _read_int, b"d": _read_float, b"s": _read_string}


def _show(kind: bytes) -> str:
    return repr(kind.decode()) if 0x20 < kind[0] < 0x7F else f"0x{kind.hex()}"


def loads(data: bytes) -> Any:
    """Decode one PHP-serialized value; arrays become dicts in their original order.

    Raises DecodeError, with the byte offset, for anything malformed or refused.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"loads() needs bytes, not {type(data).__name__}")
    reader = _Reader(bytes(data))
    stack: List[_Array] = []
    while True:
        item = reader.read_value(depth=len(stack))
        if isinstance(item, _Array):
            stack.append(item)
        elif stack:
            stack[-1].put(item)
        else:
            return reader.finish(item)
        while stack[-1].full:
            reader.close(stack[-1])
            done = stack.pop().items
            if not stack:
                return reader.finish(done)
            stack[-1].put(done)
        stack[-1].key = reader.read_key(stack[-1])


def dumps(value: Any) -> bytes:
    """Encode str/int/bool/None/float/list/tuple/dict as PHP `serialize()` would.

    Lists and tuples become arrays keyed 0..n-1. Raises TypeError for other types and
    ValueError for integers outside 64 bits or nesting deeper than `MAX_DEPTH`.
    """
    out: List[bytes] = []
    _dump(value, out, depth=0)
    return b"".join(out)


def _dump(value: Any, out: List[bytes], depth: int) -> None:
    if value is None:
        out.append(b"N;")
    elif isinstance(value, bool):
        out.append(b"b:1;" if value else b"b:0;")
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"integer {value} does not fit in 64 bits")
        out.append(b"i:%d;" % value)
    elif isinstance(value, float):
        out.append(b"d:%s;" % _float_text(value))
    elif isinstance(value, str):
        encoded = value.encode("utf-8")
        out.append(b's:%d:"%s";' % (len(encoded), encoded))
    elif isinstance(value, (list, tuple)):
        _dump_array(dict(enumerate(value)), out, depth)
    elif isinstance(value, dict):
        _dump_array(value, out, depth)
    else:
        raise TypeError(f"cannot PHP-serialize {type(value).__name__}")


def _dump_array(items: dict, out: List[bytes], depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise ValueError(f"arrays nested deeper than {MAX_DEPTH}")
    out.append(b"a:%d:{" % len(items))
    for key, item in items.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"array keys must be int or str, not {type(key).__name__}")
        _dump(key, out, depth)
        _dump(item, out, depth + 1)
    out.append(b"}")


def _float_text(value: float) -> bytes:
    if math.isnan(value):
        return b"NAN"
    if math.isinf(value):
        return b"INF" if value > 0 else b"-INF"
    return repr(value).encode("ascii")
