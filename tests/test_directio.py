"""Uncached reads: exact bytes at unaligned offsets, through O_DIRECT or the buffered fallback."""

import os

import pytest

from specplan.engine.io import directio


@pytest.fixture
def data_file(tmp_path):
    data = os.urandom(3 * directio.ALIGN + 123)
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize("offset,n", [(0, 10), (5, 4096), (4095, 2), (4096, 8192), (12000, 411), (0, 3 * 4096 + 123)])
def test_read_exact_bytes(data_file, offset, n):
    path, data = data_file
    with directio.open_direct(path) as f:
        buf = directio.aligned_buffer(directio.span_bytes(offset, n))
        assert bytes(f.read_into(buf, offset, n)) == data[offset : offset + n]


def test_buffered_fallback_reads_the_same(data_file, monkeypatch):
    path, data = data_file
    monkeypatch.setattr(directio, "_probe_direct", lambda fd, size: False)
    with directio.open_direct(path) as f:
        assert not f.direct
        buf = directio.aligned_buffer(100)
        assert bytes(f.read_into(buf, 7, 100)) == data[7:107]
    with pytest.raises(OSError, match="O_DIRECT"):
        directio.open_direct(path, require_direct=True)


def test_out_of_range_and_small_buffer(data_file):
    path, data = data_file
    with directio.open_direct(path) as f:
        with pytest.raises(ValueError, match="outside the file"):
            f.read_into(directio.aligned_buffer(10), len(data) - 2, 10)
        if f.direct:
            with pytest.raises(ValueError, match="too small"):
                f.read_into(directio.aligned_buffer(4096), 4000, 200)


def test_write_aligned_offsets(tmp_path):
    chunks = [b"a" * 10, b"b" * 5000, b"c"]
    p = tmp_path / "out.bin"
    offs = directio.write_aligned(p, chunks)
    assert offs == [0, 4096, 12288]
    assert os.path.getsize(p) % directio.ALIGN == 0
    with directio.open_direct(p) as f:
        for o, c in zip(offs, chunks):
            buf = directio.aligned_buffer(directio.span_bytes(o, len(c)))
            assert bytes(f.read_into(buf, o, len(c))) == c
