"""Ways to damage a cache file for real: truncated, bits flipped, emptied, replaced by a directory
or a FIFO, or an .npz whose member claims an enormous shape."""

from __future__ import annotations

import struct
from pathlib import Path


def damage(kind: str, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped":
        flipped = bytearray(data)
        for at in range(40, len(flipped), 97):
            flipped[at] ^= 0x20
        path.write_bytes(bytes(flipped))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "fifo":
        import os

        path.unlink()
        os.mkfifo(path)
    elif kind == "absurd header":  # an .npy member claiming an enormous shape
        import io
        import zipfile

        header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000000, 64), }"
        npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + 1) + header + b"\n"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("names.npy", npy)
            z.writestr("rows.npy", npy)
        path.write_bytes(buffer.getvalue())
