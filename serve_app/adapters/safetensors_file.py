"""Read a safetensors file with numpy: the header length first, a bounded header, then tensors.

Why not the safetensors library's reader, for a tenant's adapter:
* it parses a header of up to 100 MB before the caller can look at it (an 86 MB header took
  825 ms); here the 8-byte header length is read first, and a header over the limit is refused
  before a byte of it is read (``HeaderTooLargeError``);
* its numpy loader has no bfloat16 and its torch loader runs torch kernels. Here tensors come out
  as numpy arrays (bfloat16 widened to float32, exactly), so an adapter can be parsed and
  checked on a worker thread without a torch kernel: a torch op on a second thread starts a
  second OpenMP team beside the engine's (see engine.py, LoRAEngine), which slows every decode
  step afterwards.

The format: ``<u64 little-endian N><N bytes of JSON header><data>``; the header maps tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data),
plus an optional ``__metadata__`` object. Pure Python + numpy; no torch, no engine import.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

MAX_HEADER_BYTES = 1 << 20  # a LoRA adapter's header is ~150 bytes per tensor: 7B all-linear ~70 KB

# safetensors dtype code -> (torch's name for it, for messages; item size in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what ``read_array`` returns as floats
_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file (the reason, without the file's path)."""


class HeaderTooLargeError(ValueError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"header of {size} bytes, more than the limit {limit}")
        self.size, self.limit = size, limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # the file's code: "F32", "BF16", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype_name(self) -> str:
        return DTYPES.get(self.dtype, (self.dtype, 0))[0]


def read_header_length(f: BinaryIO) -> int:
    """The header's length in bytes, from the file's first 8 bytes (the file at offset 0)."""
    head = f.read(8)
    if len(head) < 8:
        raise SafetensorsFormatError(f"the file is {len(head)} bytes, shorter than the 8-byte header length")
    return int.from_bytes(head, "little")


def read_index(f: BinaryIO, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorEntry]:
    """The file's tensors by name (header order), from ``f`` opened in binary mode at offset 0.

    Raises ``HeaderTooLargeError`` (before reading the header) or ``SafetensorsFormatError``.
    """
    file_size = os.fstat(f.fileno()).st_size
    n = read_header_length(f)
    if n > max_header_bytes:
        raise HeaderTooLargeError(n, max_header_bytes)
    if 8 + n > file_size:
        raise SafetensorsFormatError(f"the header length {n} runs past the end of the file ({file_size} bytes)")
    raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsFormatError(f"the file ended inside its {n}-byte header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsFormatError(f"the header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("the header is not a JSON object")
    data_start, data_len = 8 + n, file_size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, e in header.items():
        if name == "__metadata__":
            if not isinstance(e, dict):
                raise SafetensorsFormatError("__metadata__ is not a JSON object")
            continue
        shown = name[:200]
        if not isinstance(e, dict):
            raise SafetensorsFormatError(f"the entry of tensor {shown} is not a JSON object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or not dtype:
            raise SafetensorsFormatError(f"tensor {shown} has no dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise SafetensorsFormatError(f"tensor {shown} has no valid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise SafetensorsFormatError(f"tensor {shown} has data offsets outside the file's {data_len} data bytes")
        itemsize = DTYPES.get(dtype, (None, 0))[1]
        if itemsize and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise SafetensorsFormatError(
                f"tensor {shown}: shape {shape} of {dtype} is {math.prod(shape) * itemsize} bytes, its data "
                f"offsets span {offsets[1] - offsets[0]}")
        out[name] = TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    return out


def read_array(f: BinaryIO, entry: TensorEntry) -> np.ndarray:
    """One tensor's values as a numpy array: float64 / float32 / float16 as stored, bfloat16
    widened to float32 (exact). Only ``FLOAT_DTYPES``."""
    if entry.dtype not in _NUMPY:
        raise ValueError(f"read_array reads {FLOAT_DTYPES}, not {entry.dtype}")
    f.seek(entry.start)
    buf = f.read(entry.nbytes)
    if len(buf) != entry.nbytes:
        raise SafetensorsFormatError(f"tensor {entry.name[:200]}: the file ended inside its data")
    arr = np.frombuffer(buf, dtype=_NUMPY[entry.dtype]).reshape(entry.shape)
    if entry.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr
