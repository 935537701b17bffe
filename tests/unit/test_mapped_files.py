"""Giving back a mapped checkpoint's pages: RSS drops, the bytes stay readable, anonymous memory is never touched."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from fitserve.quant.mapped_files import PAGE, drop_file_pages, in_ranges, mapped_file_ranges

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise: Linux")


def resident_bytes(address: int) -> int:
    """Resident bytes of the mapping that holds `address` (/proc/self/smaps' Rss line for it)."""
    total = 0
    lines = Path("/proc/self/smaps").read_text().splitlines()
    current = None
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            current = (start, end) if start <= address < end else None
        elif current is not None and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_file_pages_leave_rss_and_read_back_the_same(tmp_path: Path) -> None:
    data = torch.arange(4 * PAGE, dtype=torch.int32)  # 16 pages
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.numpy().tobytes())
    with path.open("rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = torch.frombuffer(mapping, dtype=torch.int32)
    assert int(view.sum()) == int(data.sum())  # every page touched: resident
    ranges = mapped_file_ranges()
    assert in_ranges(view.data_ptr(), ranges)
    before = resident_bytes(view.data_ptr())
    released = drop_file_pages(view.data_ptr(), view.nbytes, ranges)
    assert released == view.nbytes  # the mapping starts on a page boundary and is whole pages
    assert resident_bytes(view.data_ptr()) <= before - released
    assert torch.equal(view, data)  # faulted back in from the file, same bytes


def test_anonymous_memory_and_spans_outside_a_mapping_are_refused() -> None:
    tensor = torch.ones(8 * PAGE)
    assert drop_file_pages(tensor.data_ptr(), tensor.nbytes, mapped_file_ranges()) == 0
    assert bool((tensor == 1).all())
    start = 10 * PAGE
    assert drop_file_pages(start + 1, 3 * PAGE, [(start, start + 2 * PAGE)]) == 0  # runs past the mapping's end


def test_ranges_come_from_the_maps_file(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000100000 r--p 00000000 08:01 42   /m/model-00001.safetensors\n"
        "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"
        "7f0000400000-7f0000500000 r--p 00000000 08:01 43   /usr/lib/libc.so.6\n"
    )
    assert mapped_file_ranges(maps=maps) == [(0x7F0000000000, 0x7F0000100000)]
    assert mapped_file_ranges(maps=tmp_path / "absent") == []
