"""Which tensors hold NaN or Inf: checked on what a checkpoint brings in, and on the model before
any weights are written, so no run claims success over bad values (a NaN BatchNorm `running_var`
trains without a non-finite loss and ends up in the saved weights)."""

from __future__ import annotations

import ctypes
import mmap
from typing import Mapping

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """Exact, and one fast pass in the usual case: a NaN or Inf anywhere makes the sum NaN or Inf,
    so a finite sum (in the tensor's own dtype: no converted copy, ~0.05 s per GiB) proves every
    value finite. Only a sum that is not finite -- a real NaN/Inf, or finite values whose sum
    overflows (float16) -- is checked element by element."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def nonfinite_keys(tensors: Mapping[str, torch.Tensor], mapped: bool = False) -> list[str]:
    """The keys whose floating-point values include NaN or Inf, in order. `mapped`: every tensor is a
    view of a private file mapping not written to yet; the pages the check reads are handed back
    as it goes, so checking a 1 GB memory-mapped checkpoint does not hold 1 GB in this process."""
    check = all_finite_mapped if mapped else all_finite
    return [key for key, tensor in tensors.items() if not check(tensor.detach())]


_CHUNK_BYTES = 64 * 2**20


def all_finite_mapped(tensor: torch.Tensor) -> bool:
    """`all_finite`, 64 MiB at a time, each chunk's whole pages released after it is read
    (madvise MADV_DONTNEED: on a clean private file mapping the next access reads them again from
    the file, so the values are unchanged). Only for tensors that are views of such a mapping:
    on ordinary memory DONTNEED would zero the pages."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or not tensor.is_contiguous():
        return all_finite(tensor)
    flat = tensor.view(-1)
    step = max(1, _CHUNK_BYTES // tensor.element_size())
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step]
        if not all_finite(chunk):
            return False
        _release(chunk.data_ptr(), chunk.numel() * chunk.element_size())
    return True


def _release(address: int, length: int) -> None:
    """madvise(MADV_DONTNEED) over the whole pages inside [address, address + length)."""
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + length) // page * page
    if end > start and _LIBC is not None:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc if hasattr(mmap, "MADV_DONTNEED") else None
    except (OSError, AttributeError):  # no madvise here: the check keeps the pages, nothing else changes
        return None


_LIBC = _libc()


def count_nonfinite(tensor: torch.Tensor) -> int:
    return int((~torch.isfinite(tensor.detach())).sum())
