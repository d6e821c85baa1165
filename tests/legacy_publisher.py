"""The bytes a legacy Pydio 6 publisher (PHP "phpws" client) writes, for tests.

See ../shared/fixtures/phpws/README.md: an absolute-form hybi-08 request head, 8 stray
bytes, then masked text frames whose length form is not always the minimal one. Besides
generating those bytes, `parse_client_stream` takes a capture apart so tests can check
the generator against the real thing, and `legacy_publish` plays the client on a socket.
"""

import base64
import os
import random
import struct
from typing import List, NamedTuple, Optional, Tuple, Union

from twisted.internet import defer

from pydio_ws.phpserialize import dumps
from tests.support import raw_connect

STRAY_BYTE_COUNT = 8
WRITE_PIECE = 4096
# The PHP client switches to the 8-byte length from here on, though 16 bits would do.
LEGACY_LONG_FROM = 65025
_TEXT_FIN = 0x81
_MASK_BIT = 0x80


def legacy_handshake(host: str, port: int, path: str, key: str, nonce: Optional[str] = None) -> bytes:
    """The request head, header lines in the PHP client's order, `Admin-Key` last.

    `nonce` is the Sec-WebSocket-Key (base64 of 16 random bytes when not given).
    """
    nonce = nonce or base64.b64encode(os.urandom(16)).decode("ascii")
    lines = [
        f"GET ws://{host}:{port}/{path.lstrip('/')} HTTP/1.1",
        "Connection: Upgrade",
        f"Host: {host}:{port}",
        f"Sec-WebSocket-Key: {nonce}",
        f"Sec-WebSocket-Origin: http://{host}",
        "Sec-WebSocket-Version: 8",
        "Upgrade: websocket",
        f"Admin-Key: {key}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def stray_bytes(seed_or_value: Union[None, int, bytes] = None) -> bytes:
    """The 8 bytes sent after the head: random, seeded (int) or given as is (bytes)."""
    if seed_or_value is None:
        return os.urandom(STRAY_BYTE_COUNT)
    if isinstance(seed_or_value, int):
        return random.Random(seed_or_value).randbytes(STRAY_BYTE_COUNT)
    if len(seed_or_value) != STRAY_BYTE_COUNT:
        raise ValueError(f"stray bytes must be {STRAY_BYTE_COUNT} bytes, not {len(seed_or_value)}")
    return bytes(seed_or_value)


def legacy_frame(payload: bytes, length_form: str = "legacy", mask: Optional[bytes] = None) -> bytes:
    """One masked text frame (FIN=1, opcode 1) carrying `payload`.

    `length_form` is "legacy" (what the PHP client picks) or "7", "16", "64" to force one;
    `mask` is the 4-byte masking key, random when not given.
    """
    mask = os.urandom(4) if mask is None else mask
    if len(mask) != 4:
        raise ValueError("the masking key is 4 bytes")
    return bytes([_TEXT_FIN]) + _length_field(len(payload), length_form) + mask + apply_mask(payload, mask)


def _length_field(size: int, length_form: str) -> bytes:
    """The length byte (with the MASK bit) and any extended length for `size`."""
    if length_form == "legacy":
        length_form = "7" if size <= 125 else "16" if size < LEGACY_LONG_FROM else "64"
    if length_form == "7" and size <= 125:
        return bytes([_MASK_BIT | size])
    if length_form == "16" and size <= 0xFFFF:
        return bytes([_MASK_BIT | 126]) + struct.pack(">H", size)
    # The PHP client writes only the low 32 bits, under 4 zero bytes.
    if length_form == "64" and size <= 0xFFFFFFFF:
        return bytes([_MASK_BIT | 127]) + struct.pack(">Q", size)
    raise ValueError(f"cannot encode {size} bytes in length form {length_form!r}")


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR `data` with the repeated 4-byte `mask` (masking and unmasking alike)."""
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")


def split_writes(data: bytes, piece: int = WRITE_PIECE) -> List[bytes]:
    """Cut `data` into the successive writes of at most `piece` bytes the client makes."""
    if piece < 1:
        raise ValueError("piece must be at least 1 byte")
    return [data[start : start + piece] for start in range(0, len(data), piece)]


class Frame(NamedTuple):
    """One client frame taken apart: `header` excludes the mask, `payload` is unmasked."""

    header: bytes
    mask: bytes
    payload: bytes


def parse_frames(data: bytes) -> List[Frame]:
    """Split back-to-back masked frames; raises ValueError on a truncated or unmasked one."""
    frames = []
    pos = 0
    while pos < len(data):
        frame, pos = _parse_frame(data, pos)
        frames.append(frame)
    return frames


def _parse_frame(data: bytes, pos: int) -> Tuple[Frame, int]:
    if len(data) < pos + 2:
        raise ValueError(f"truncated frame header at byte {pos}")
    if not data[pos + 1] & _MASK_BIT:
        raise ValueError(f"unmasked frame at byte {pos}")
    extra = {126: 2, 127: 8}.get(data[pos + 1] & 0x7F, 0)
    header_end = pos + 2 + extra
    size = int.from_bytes(data[pos + 2 : header_end], "big") if extra else data[pos + 1] & 0x7F
    end = header_end + 4 + size
    if len(data) < end:
        raise ValueError(f"truncated frame at byte {pos}")
    mask = data[header_end : header_end + 4]
    return Frame(data[pos:header_end], mask, apply_mask(data[header_end + 4 : end], mask)), end


def parse_client_stream(data: bytes) -> Tuple[bytes, bytes, List[bytes]]:
    """Take a full capture apart into (head, stray bytes, unmasked payloads)."""
    head_end = data.index(b"\r\n\r\n") + 4
    frames_start = head_end + STRAY_BYTE_COUNT
    frames = parse_frames(data[frames_start:])
    return data[:head_end], data[head_end:frames_start], [frame.payload for frame in frames]


def php_message(content: str, repo="1", **fields) -> bytes:
    """PHP serialize() of a message array, as the PHP host publishes it."""
    return dumps({"REPO_ID": repo, "CONTENT": content, **fields})


async def legacy_publish(port: int, head: bytes, stray: bytes, frames: bytes, piece: int = 4096):
    """Act like the PHP client: head and stray bytes, read once, frames in pieces, TCP close.

    Returns the server's answer to the head.
    """
    client = await raw_connect(port)
    client.transport.write(head + stray)
    answer = await defer.DeferredList([client.head, client.done], fireOnOneCallback=True)
    for chunk in split_writes(frames, piece):
        client.transport.write(chunk)
    client.transport.loseConnection()
    await client.done
    return answer[0]
