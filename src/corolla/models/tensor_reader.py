"""Reading chosen tensors of a safetensors file into memory of their own, with large reads in file order.

A server reads a few blocks out of shards that also hold other blocks, and its weights may be tens of GB, so:

- only the byte ranges of the wanted tensors are read, in file-offset order (sequential reads, gaps skipped);
- each tensor is read straight into its own freshly allocated storage, which the model then adopts as is
  (``load_state_dict(..., assign=True)``): the span's bytes are in memory once. safetensors' ``get_tensor`` copies
  out of a memory map whose file pages also count in the process's resident memory while the file is open;
- ranges that are not in the OS page cache are read with ``O_DIRECT`` (Linux): the disk writes into the tensor,
  with no copy through the page cache and no readahead past the wanted range (the page cache is not filled with
  GBs that will not be read again). Ranges that are cached (a checkpoint just downloaded, or read by another
  server on the same machine) are read through the page cache, which is then a memory copy. Where ``O_DIRECT`` or
  ``mincore`` is not available (another OS, a file system that refuses it), every read goes through the page
  cache;
- destination buffers are advised to use transparent huge pages: on a VM, first-touch page faults of fresh memory
  cost about as much as the disk read itself (measured on the development VM, see docs/benchmarks.md).

A tensor whose dtype safetensors knows but torch does not map here is read with safetensors itself.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from corolla.errors import ModelNotFoundError
from corolla.log import get_logger

logger = get_logger(__name__)

#: one read call at most this long (Linux caps a read at ~2 GiB; shorter calls bound what one call pins or faults)
READ_CHUNK_BYTES = 64 << 20
#: O_DIRECT alignment of file offsets, lengths and buffer addresses (covers 512-byte and 4 KiB logical blocks)
DIRECT_ALIGN = 4096
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lies in a safetensors file: ``begin..end`` are absolute byte offsets in the file."""

    dtype: str  # safetensors' name of the dtype ("BF16", ...)
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def num_bytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path | str) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file by name (its ``__metadata__`` left out); ModelNotFoundError if malformed."""
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):  # no readahead: the header is all that is needed here
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelNotFoundError(f"{path} is not a safetensors file (too short): re-download or re-save it")
        (header_bytes,) = struct.unpack("<Q", prefix)
        size = os.fstat(f.fileno()).st_size
        if header_bytes > size - 8:
            raise ModelNotFoundError(f"{path}: its header says {header_bytes} bytes, the file has {size}")
        header = json.loads(f.read(header_bytes))
    data_start = 8 + header_bytes
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(
            dtype=info["dtype"], shape=tuple(info["shape"]), begin=data_start + begin, end=data_start + end
        )
    return entries


def read_tensors(
    path: Path | str, keys: Iterable[str], *, dtypes: Mapping[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors ``keys`` of the safetensors file ``path``, read in file order, each into storage of its own.

    ``dtypes`` maps a key to the dtype its tensor should have: a floating tensor stored in another dtype is cast
    right after it is read (so a cast never holds more than one extra tensor). KeyError for a key the file lacks;
    ModelNotFoundError if the file is shorter than its header says.

    While a tensor is read, a helper thread allocates and faults in the memory of the next one (when it needs no
    cast), so that the page faults of fresh memory, which cost CPU, overlap the disk's transfer, which does not.
    """
    entries = read_header(path)
    wanted = sorted(keys, key=lambda key: entries[key].begin)
    dtypes = dtypes or {}

    def needs_cast(key: str) -> bool:
        target = dtypes.get(key)
        stored = DTYPES.get(entries[key].dtype)
        return target is not None and stored is not None and stored.is_floating_point and stored != target

    # a tensor to be cast is read into one scratch buffer, reused, and cast out of it: reading each into fresh
    # memory of its own, then freeing it, leaves the allocator's heap holed and the process ~1.4x the span's bytes
    cast_bytes = [entries[key].num_bytes for key in wanted if entries[key].dtype in DTYPES and needs_cast(key)]
    scratch = _fresh_bytes(max(cast_bytes) + 3 * DIRECT_ALIGN) if cast_bytes else None
    tensors: dict[str, torch.Tensor] = {}
    with _File(path) as file, ThreadPoolExecutor(1, thread_name_prefix="corolla-prefault") as helper:
        ahead = None
        for i, key in enumerate(wanted):
            entry = entries[key]
            if entry.dtype not in DTYPES:
                tensors[key] = _read_with_safetensors(path, key)
                continue
            cast = needs_cast(key)
            if cast:
                target = file.prepare(entry, into=scratch)
            else:
                target = file.prepare(entry) if ahead is None else ahead.result()
            ahead = None
            following = wanted[i + 1] if i + 1 < len(wanted) else None
            if following is not None and entries[following].dtype in DTYPES and not needs_cast(following):
                ahead = helper.submit(file.prepare, entries[following], fault_in=True)
            tensor = file.fill(target)
            if cast:
                tensor = tensor.to(dtypes[key])  # out of the scratch buffer, into storage of its own
            tensors[key] = tensor
    return tensors


@dataclass
class _Target:
    """Where one tensor's bytes go: ``buffer[skip:skip + length]`` receives the file's ``first..first + length``
    (at least ``needed`` bytes of it); the tensor starts ``at`` bytes into the buffer."""

    entry: TensorEntry
    buffer: torch.Tensor
    direct: bool
    first: int
    skip: int
    length: int
    at: int


class _File:
    """An open safetensors file: reads tensor byte ranges, direct (O_DIRECT) where the page cache lacks them."""

    def __init__(self, path: Path | str):
        self.path = path
        self.fd = -1
        self.direct_fd: int | None = None
        self.resident: bytes | None = None
        self.size = 0

    def __enter__(self) -> _File:
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        if _libc() is not None and hasattr(os, "O_DIRECT"):
            self.resident = _resident_pages(self.fd, self.size)
            if self.resident is not None:
                try:
                    self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                except OSError as e:  # a file system without O_DIRECT
                    logger.debug("No O_DIRECT for %s (%s): reading through the page cache", self.path, e)
        return self

    def __exit__(self, *exc) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)

    def prepare(self, entry: TensorEntry, *, fault_in: bool = False, into: torch.Tensor | None = None) -> _Target:
        """Allocate the memory ``entry`` is read into (faulted in now if ``fault_in``), or use ``into``, a byte
        buffer at least ``entry.num_bytes + 3 * DIRECT_ALIGN`` long."""
        if entry.end > self.size:
            raise ModelNotFoundError(
                f"{self.path} is truncated (a tensor ends at byte {entry.end}, the file has {self.size}): "
                "re-download the checkpoint"
            )
        if self.direct_fd is not None and not self._cached(entry):
            first = entry.begin - entry.begin % DIRECT_ALIGN
            length = -(-(entry.end - first) // DIRECT_ALIGN) * DIRECT_ALIGN  # past the end of the file is fine
            buffer = _fresh_bytes(length + DIRECT_ALIGN, fault_in=fault_in) if into is None else into
            skip = -buffer.data_ptr() % DIRECT_ALIGN  # the aligned start of the buffer
            return _Target(entry, buffer, True, first, skip, length, skip + entry.begin - first)
        buffer = _fresh_bytes(entry.num_bytes, fault_in=fault_in) if into is None else into
        return _Target(entry, buffer, False, entry.begin, 0, entry.num_bytes, 0)

    def fill(self, target: _Target) -> torch.Tensor:
        """Read ``target``'s bytes and return its tensor."""
        entry, dtype = target.entry, DTYPES[target.entry.dtype]
        if entry.num_bytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        if target.direct and self.direct_fd is not None:
            view = memoryview(target.buffer.numpy())[target.skip : target.skip + target.length]
            try:
                _read_into(self.direct_fd, view, target.first, self.path, needed=entry.end - target.first)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                logger.debug("O_DIRECT read of %s refused (%s): reading through the page cache", self.path, e)
                os.close(self.direct_fd)
                self.direct_fd = None
            else:
                data = target.buffer[target.at : target.at + entry.num_bytes]
                if target.at % dtype.itemsize:  # the file does not align this tensor to its dtype: copy it
                    data = data.clone()
                return data.view(dtype).view(entry.shape)
        data = target.buffer[target.at : target.at + entry.num_bytes]
        _read_into(self.fd, memoryview(data.numpy()), entry.begin, self.path)
        if target.at % dtype.itemsize:
            data = data.clone()
        return data.view(dtype).view(entry.shape)

    def _cached(self, entry: TensorEntry) -> bool:
        page = _PAGE_SIZE
        return self.resident is not None and self.resident.find(0, entry.begin // page, -(-entry.end // page)) < 0


def _read_into(fd: int, view: memoryview, offset: int, path, *, needed: int | None = None) -> None:
    """Fill ``view`` from ``offset`` (or at least its first ``needed`` bytes: an O_DIRECT read stops at the end of
    the file, which need not be aligned)."""
    needed = len(view) if needed is None else needed
    done = 0
    while done < needed:
        count = os.preadv(fd, [view[done : done + READ_CHUNK_BYTES]], offset + done)
        if count == 0:
            raise ModelNotFoundError(f"{path} ended at byte {offset + done} while reading: re-download it")
        done += count


def _fresh_bytes(num_bytes: int, *, fault_in: bool = False) -> torch.Tensor:
    """Uninitialized memory, advised to use transparent huge pages; with ``fault_in``, its pages are allocated now."""
    buffer = torch.empty(num_bytes, dtype=torch.uint8)
    libc = _libc()
    if libc is None or num_bytes < _HUGE_PAGE:
        return buffer
    start = -(-buffer.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (buffer.data_ptr() + num_bytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:  # advice only: ignored where transparent huge pages are off
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    if fault_in:
        page_start = buffer.data_ptr() // _PAGE_SIZE * _PAGE_SIZE
        length = buffer.data_ptr() + num_bytes - page_start
        if libc.madvise(ctypes.c_void_p(page_start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE) != 0:
            buffer[::_PAGE_SIZE].zero_()  # a kernel older than 5.14: touch every page
    return buffer


def _resident_pages(fd: int, size: int) -> bytes | None:
    """One byte per page of the file, nonzero where the page is in the page cache (``mincore``); None if unknown."""
    libc = _libc()
    if libc is None or size == 0:
        return None
    address = libc.mmap(None, ctypes.c_size_t(size), 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: faults nothing in
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        vector = (ctypes.c_ubyte * -(-size // _PAGE_SIZE))()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            return None
        return bytes(vector)
    finally:
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))


def cached_bytes(path: Path | str, begin: int = 0, end: int | None = None) -> int | None:
    """Bytes of ``begin..end`` of the file that are in the OS page cache (whole pages), or None where unknown."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        resident = _resident_pages(fd, size)
    finally:
        os.close(fd)
    if resident is None:
        return None if size else 0
    end = size if end is None else end
    pages = resident[begin // _PAGE_SIZE : -(-end // _PAGE_SIZE)]
    return (len(pages) - pages.count(0)) * _PAGE_SIZE


def _read_with_safetensors(path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


@functools.cache
def _libc():
    """libc's mmap, mincore and madvise (Linux only; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them
        libc.mincore  # noqa: B018 (raises AttributeError if missing)
    except (OSError, AttributeError):
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
