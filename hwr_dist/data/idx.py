"""Reader for MNIST's IDX format (plain or .gz), strict about every byte.

A file whose magic number, dimensions or length are wrong raises HwrError: a silently
wrong data set is worse than none.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import torch

from hwr_dist.errors import HwrError

# Third magic byte: element type. Only the two that MNIST-family files use.
_DTYPES = {0x08: torch.uint8, 0x0C: torch.int32}


def read_idx(path: Path, expect_dims: int) -> torch.Tensor:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise HwrError(f"{path} is unreadable or a truncated gzip file ({e}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise HwrError(f"{path} is not an IDX file (wrong magic number {raw[:4].hex()}); download it again")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    if ndim != expect_dims:
        raise HwrError(f"{path} has {ndim} dimensions, expected {expect_dims}: is it an images/labels file swapped?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HwrError(f"{path} is truncated inside its header; download it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = header + itemsize * int(torch.tensor(dims).prod())
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise HwrError(f"{path} is {state} ({len(raw)} bytes, header says {expected}); download it again")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if dtype is torch.int32:
        data = data.view(-1, 4).flip(1).contiguous().view(torch.int32)  # IDX is big-endian
    return data.view(*dims).clone()


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as IDX (gzip-compressed if the name ends in .gz); used by tests and tools."""
    t = tensor.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, t.dim()]) + b"".join(d.to_bytes(4, "big") for d in t.shape)
    body = header + t.numpy().tobytes()
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
