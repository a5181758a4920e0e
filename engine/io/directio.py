"""Reading files past the page cache: O_DIRECT with aligned buffers, or buffered reads plus
``posix_fadvise(DONTNEED)`` where the filesystem refuses O_DIRECT.

The profiler measures the disk with these functions and the weight store reads offloaded tensors with them, so the
bandwidth the planner is given is the bandwidth the engine gets. No torch here: buffers are anonymous ``mmap``s
(page aligned), which ``torch.frombuffer`` or ``numpy.frombuffer`` can view without a copy.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

#: alignment of offsets, lengths and buffers for O_DIRECT (covers 512-byte and 4 KiB logical blocks).
ALIGN = 4096


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def align_down(n: int, a: int = ALIGN) -> int:
    return n // a * a


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of at least ``nbytes`` (rounded up to ``ALIGN``)."""
    return mmap.mmap(-1, max(ALIGN, align_up(nbytes)))


@dataclass
class DirectFile:
    """A file opened for uncached reads. ``direct`` says whether O_DIRECT is in effect."""

    path: str
    fd: int
    direct: bool
    size: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_into(self, buf: mmap.mmap | memoryview, offset: int, nbytes: int) -> memoryview:
        """Read ``nbytes`` at ``offset`` into ``buf``; returns the view of exactly those bytes inside ``buf``.

        With O_DIRECT the read covers the aligned span around the request, so ``buf`` must hold
        ``span_bytes(offset, nbytes)`` bytes. Without it, the pages read are dropped from the page cache afterwards.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"{self.path}: read of {nbytes} bytes at {offset} is outside the file ({self.size} bytes)")
        view = memoryview(buf)
        if self.direct:
            start = align_down(offset)
            span = align_up(offset + nbytes) - start
            if span > len(view):
                raise ValueError(f"buffer of {len(view)} bytes is too small for an aligned read of {span}")
            _read_fully(self.fd, view[:span], start, min(span, align_up(self.size) - start), self.path)
            lead = offset - start
            return view[lead : lead + nbytes]
        if nbytes > len(view):
            raise ValueError(f"buffer of {len(view)} bytes is too small for {nbytes}")
        _read_fully(self.fd, view[:nbytes], offset, nbytes, self.path)
        _drop_cache(self.fd, offset, nbytes)
        return view[:nbytes]


def span_bytes(offset: int, nbytes: int) -> int:
    """Buffer size an O_DIRECT read of ``nbytes`` at ``offset`` needs."""
    return align_up(offset + nbytes) - align_down(offset)


def open_direct(path: str | os.PathLike, require_direct: bool = False) -> DirectFile:
    """Open for reading with O_DIRECT if the filesystem allows it, else buffered (pages dropped after each read)."""
    path = os.fspath(path)
    size = os.stat(path).st_size
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            fd = os.open(path, os.O_RDONLY | flag)
            if _probe_direct(fd, size):
                return DirectFile(path, fd, True, size)
            os.close(fd)
        except OSError:
            pass
    if require_direct:
        raise OSError(f"{path}: the filesystem does not support O_DIRECT reads")
    return DirectFile(path, os.open(path, os.O_RDONLY), False, size)


def open_buffered(path: str | os.PathLike) -> DirectFile:
    """Open for buffered reads through the page cache (the pages read are dropped again after each read)."""
    path = os.fspath(path)
    return DirectFile(path, os.open(path, os.O_RDONLY), False, os.stat(path).st_size)


def _probe_direct(fd: int, size: int) -> bool:
    """Some filesystems accept the O_DIRECT flag on open and fail on the first read (tmpfs, some FUSE)."""
    if size == 0:
        return True
    buf = aligned_buffer(ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()


def _read_fully(fd: int, view: memoryview, offset: int, want: int, path: str) -> None:
    """pread until ``want`` bytes have arrived (short reads happen at EOF of the aligned span and on signals)."""
    got = 0
    while got < want:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            if got < want and offset + got >= os.fstat(fd).st_size:
                return  # EOF inside the final aligned block: the rest of the buffer is padding
            raise OSError(f"{path}: short read at {offset + got}")
        got += n


def _drop_cache(fd: int, offset: int, nbytes: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def drop_file_cache(path: str | os.PathLike) -> None:
    """Ask the kernel to forget the cached pages of a file (used after writing an offload file)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        _drop_cache(fd, 0, 0)
    finally:
        os.close(fd)


def write_aligned(path: str | os.PathLike, chunks: list[bytes | memoryview], sync: bool = True) -> list[int]:
    """Write chunks each starting at an ``ALIGN``-aligned offset (zero padding between); returns the offsets.

    The file is written to a temporary name and renamed, synced, and its pages dropped from the cache so that later
    reads really come from the disk.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    offsets = []
    pos = 0
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                pad = align_up(pos) - pos
                if pad:
                    f.write(b"\0" * pad)
                    pos += pad
                offsets.append(pos)
                f.write(c)
                pos += len(memoryview(c).cast("B"))
            pad = align_up(pos) - pos
            if pad:
                f.write(b"\0" * pad)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an interrupted write leaves no half file behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    drop_file_cache(path)
    return offsets
