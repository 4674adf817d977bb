"""A TensorFlow V2 checkpoint ("tensor bundle") writer, for tests: it makes the OpenAI-format
files the library's reader (`lm_human_preferences/language/tf_checkpoint.py`, whose docstring
describes the format) must read, byte-identical to TensorFlow's own for the same tensors."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from lm_human_preferences.language.tf_checkpoint import _DT_BFLOAT16, _TF_DTYPES, MAGIC, crc32c, mask_crc

_NP_TO_TF = {code: enum for enum, code in _TF_DTYPES.items() if enum != _DT_BFLOAT16}


def _enc_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _enc_len(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | 2) + _enc_varint(len(payload)) + payload


def _encode_entry(tf_dtype: int, shape, offset: int, size: int, masked_crc: int) -> bytes:
    dims = b"".join(_enc_len(2, _enc_varint(1 << 3) + _enc_varint(d)) for d in shape)
    msg = _enc_varint(1 << 3) + _enc_varint(tf_dtype) + _enc_len(2, dims)
    for num, v in ((4, offset), (5, size)):  # shard_id (3) is always 0 here; zeros are omitted
        if v:
            msg += _enc_varint(num << 3) + _enc_varint(v)
    return msg + _enc_varint(6 << 3 | 5) + struct.pack("<I", masked_crc)


class _BlockBuilder:
    """Accumulates prefix-compressed entries exactly like LevelDB's BlockBuilder."""

    def __init__(self, restart_interval: int = 16):
        self.buf, self.restarts, self.counter, self.last = bytearray(), [0], 0, b""
        self.interval = restart_interval

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            shared = len(os.path.commonprefix([self.last, key]))
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += _enc_varint(shared) + _enc_varint(len(key) - shared) + _enc_varint(len(value))
        self.buf += key[shared:] + value
        self.last, self.counter = key, self.counter + 1

    def size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        n = len(self.restarts)
        return bytes(self.buf) + struct.pack(f"<{n + 1}I", *self.restarts, n)


def _separator(start: bytes, limit: bytes | None) -> bytes:
    """LevelDB's short index key k with start <= k < limit (or any k >= start if limit is None)."""
    if limit is None:
        for i, c in enumerate(start):
            if c != 0xFF:
                return start[:i] + bytes([c + 1])
        return start
    i = len(os.path.commonprefix([start, limit]))
    if i < min(len(start), len(limit)) and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _build_table(items: list[tuple[bytes, bytes]], block_size: int = 4096) -> bytes:
    """SSTable for sorted (key, value) pairs; TF itself uses block_size 256 KiB, LevelDB 4 KiB."""
    out, index, block = bytearray(), _BlockBuilder(restart_interval=1), _BlockBuilder()

    def add_block(builder: _BlockBuilder) -> bytes:
        contents = builder.finish()
        handle = _enc_varint(len(out)) + _enc_varint(len(contents))
        out.extend(contents + b"\0" + struct.pack("<I", mask_crc(crc32c(contents + b"\0"))))
        return handle

    for i, (key, value) in enumerate(items):
        block.add(key, value)
        limit = items[i + 1][0] if i + 1 < len(items) else None
        if block.size() >= block_size or limit is None:
            index.add(_separator(key, limit), add_block(block))
            block = _BlockBuilder()
    footer = add_block(_BlockBuilder()) + add_block(index)  # metaindex (empty), index
    return bytes(out) + footer.ljust(40, b"\0") + struct.pack("<Q", MAGIC)


def write_checkpoint(prefix, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` as a one-shard bundle: ``<prefix>.index`` + ``.data-00000-of-00001``.

    Sorted keys, LevelDB 4 KiB blocks, header + CRCs as TF writes them (no ``checkpoint`` file).
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    version = _enc_varint(1 << 3) + _enc_varint(1)  # VersionDef {producer: 1}
    header = _enc_varint(1 << 3) + _enc_varint(1) + _enc_len(3, version)  # num_shards: 1
    items, offset = [(b"", header)], 0
    with open(f"{prefix}.data-00000-of-00001", "wb") as f:
        for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
            if not name:
                raise ValueError("tensor names must be non-empty")
            arr = np.asarray(tensors[name])
            if arr.dtype.str[1:] not in _NP_TO_TF:
                raise ValueError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            f.write(raw)
            entry = _encode_entry(_NP_TO_TF[arr.dtype.str[1:]], arr.shape, offset, len(raw),
                                  mask_crc(crc32c(raw)))
            items.append((name.encode("utf-8"), entry))
            offset += len(raw)
    Path(f"{prefix}.index").write_bytes(_build_table(items))
