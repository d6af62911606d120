"""A reader for the safetensors format (Hugging Face checkpoints), with every header field checked.

Layout: u64 little-endian header length, a JSON header mapping names to ``dtype``, ``shape`` and
``data_offsets`` [begin, end) into the byte buffer that follows, and an optional ``__metadata__``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from knnclip.engine.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, copied into memory (the file is not kept open)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {header_len} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: the safetensors header is not JSON (not a safetensors file?)") from None
        except RecursionError:  # a header nested deeper than Python's recursion limit
            raise CheckpointError(f"{path}: the safetensors header is nested too deeply; the file is damaged") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        buffer_len = size - data_start
        spans = []
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for {name!r}: {info!r}") from None
            expected = math.prod(shape) * dtype.itemsize
            # Every dimension, and the product of the non-zero ones, must be a valid tensor size
            # (a [0, 2**70] tensor holds no bytes but cannot be made).
            if any(s < 0 or s >= 1 << 62 for s in shape) or math.prod(s for s in shape if s) >= 1 << 62:
                raise CheckpointError(f"{path}: tensor {name!r} has an impossible shape {shape}; the file is damaged")
            if not 0 <= begin <= end <= buffer_len or end - begin != expected:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ({info['dtype']} {shape}) has offsets {begin}..{end} that do not "
                    f"match its size ({expected} bytes) or the data ({buffer_len} bytes); the file is damaged"
                )
            spans.append((begin, end, name, dtype, shape))
        spans.sort()
        for (_, prev_end, prev, *_), (begin, _, name, *_) in zip(spans, spans[1:], strict=False):
            if begin < prev_end:
                raise CheckpointError(f"{path}: tensors {prev!r} and {name!r} overlap; the file is damaged")
        tensors: dict[str, Any] = {}
        if not spans:
            return tensors
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for begin, end, name, dtype, shape in spans:
                raw = bytearray(mapped[data_start + begin : data_start + end])
                flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                tensors[name] = flat.reshape(shape)
    return tensors
