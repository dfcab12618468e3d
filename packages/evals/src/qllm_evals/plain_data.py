"""Plain built-in data across a process boundary: exact types only, framed messages on raw file descriptors.

The HumanEval judge and the sandboxed completion exchange call arguments and returned values through this
codec (``qllm_evals.tasks.humaneval``). What crosses is data, never objects: ``bool, int, float, complex, str,
bytes, None, list, tuple, dict, set``, recursively, with exact types (``type(x) is int``; a subclass, such as an
``int`` whose ``__eq__`` always returns True, is refused). The decoder builds only those types, so whatever bytes
an untrusted process writes, the reader gets plain data or a ``PlainDataError``.

This file is also sent, as source text, into the sandbox (which has no ``qllm_evals``): it imports only the
standard library and keeps all its names at module level.
"""

import json
import os
import select
import struct
import time

MAX_MESSAGE_BYTES = 4 * 2**20  # one call's arguments or one returned value, encoded
MAX_DEPTH = 100  # nesting of containers
_HEADER = struct.Struct(">I")


class PlainDataError(ValueError):
    """A value that is not plain built-in data, or bytes that do not encode one."""


def _to_tree(value, depth: int):
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None:
        return ["N"]
    if kind is bool:
        return ["b", int(value)]
    if kind is int:
        return ["i", hex(value)]  # hex: no int-to-decimal digit limit, exact for any size
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    if kind in (list, tuple, set):
        tag = {list: "l", tuple: "t", set: "S"}[kind]
        return [tag, [_to_tree(item, depth + 1) for item in value]]
    if kind is dict:
        return ["d", [[_to_tree(k, depth + 1), _to_tree(v, depth + 1)] for k, v in value.items()]]
    raise PlainDataError(f"a value of type {kind.__module__}.{kind.__qualname__} is not plain built-in data")


def _from_tree(tree, depth: int):
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    if type(tree) is not list or not tree or type(tree[0]) is not str:
        raise PlainDataError("malformed message")
    tag, args = tree[0], tree[1:]
    try:
        if tag == "N" and not args:
            return None
        if tag == "b" and len(args) == 1 and args[0] in (0, 1) and type(args[0]) is int:
            return bool(args[0])
        if tag == "i" and len(args) == 1 and type(args[0]) is str:
            return int(args[0], 16)
        if tag == "f" and len(args) == 1 and type(args[0]) is str:
            return float.fromhex(args[0])
        if tag == "c" and len(args) == 2 and all(type(a) is str for a in args):
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag == "s" and len(args) == 1 and type(args[0]) is str:
            return args[0]
        if tag == "y" and len(args) == 1 and type(args[0]) is str:
            return bytes.fromhex(args[0])
        if tag in ("l", "t", "S") and len(args) == 1 and type(args[0]) is list:
            items = [_from_tree(item, depth + 1) for item in args[0]]
            return items if tag == "l" else tuple(items) if tag == "t" else set(items)
        if tag == "d" and len(args) == 1 and type(args[0]) is list:
            pairs = args[0]
            if not all(type(p) is list and len(p) == 2 for p in pairs):
                raise PlainDataError("malformed dict")
            return {_from_tree(k, depth + 1): _from_tree(v, depth + 1) for k, v in pairs}
    except (TypeError, ValueError, OverflowError) as error:  # unhashable key, bad hex, ...
        raise PlainDataError(f"malformed {tag!r} value ({type(error).__name__}: {error})") from None
    raise PlainDataError(f"malformed message (tag {tag!r})")


def encode(value) -> bytes:
    """The bytes of ``value``; PlainDataError when it is not plain built-in data or too large."""
    data = json.dumps(_to_tree(value, 0), ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"encodes to {len(data)} bytes, more than the {MAX_MESSAGE_BYTES} allowed")
    return data


def decode(data: bytes):
    """The value ``encode`` wrote; PlainDataError for anything else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"message of {len(data)} bytes, more than the {MAX_MESSAGE_BYTES} allowed")
    try:
        tree = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise PlainDataError(f"malformed message ({type(error).__name__})") from None
    return _from_tree(tree, 0)


def write_message(fd: int, data: bytes) -> None:
    """Write one framed message (4-byte big-endian length, then the bytes) to a blocking descriptor."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def read_message(fd: int, deadline: float | None = None) -> bytes | None:
    """One framed message; None at end of file before a header. TimeoutError past ``deadline``
    (``time.monotonic()``), PlainDataError for a torn or oversized frame."""
    header = _read_exactly(fd, _HEADER.size, deadline)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"message of {size} bytes announced, more than the {MAX_MESSAGE_BYTES} allowed")
    body = _read_exactly(fd, size, deadline)
    if body is None:
        raise PlainDataError("message cut short by end of file")
    return body


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no reply before the deadline")
        chunk = os.read(fd, min(size - got, 2**20))
        if not chunk:
            if got == 0:
                return None
            raise PlainDataError("message cut short by end of file")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
