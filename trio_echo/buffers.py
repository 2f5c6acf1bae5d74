"""Read buffers that start on a page boundary (I/O helper).

Where a buffer starts matters for bulk copies. The kernel copies a received segment into the
caller's buffer with ``rep movsb``; the segment's data sits at a page-aligned offset when the peer
writes in page multiples (64 KiB writes, as bulk senders typically do), and when the destination is
a few bytes past that same offset within a 4 KiB page (8 to 16 bytes ahead, or up to 32 behind, on
this AMD EPYC) every store aliases the loads that follow it and the copy runs at half speed. A
``bytearray`` lands wherever the allocator puts it: above glibc's mmap threshold exactly 16 bytes
past a page start (always the slow case), below it anywhere on the heap (slow in a few runs out of
a hundred, hence figures that changed from one process to the next). Measured with the shared C
load generator streaming 10 x 64 KiB (docs/bench.md, "The streaming fix"): a server
scratch buffer at page + 16 cost 0.57-0.70 s of CPU per GB, at page + 0, + 32, + 512 or + 1904
0.33-0.35. An anonymous mapping starts on a page, whatever was allocated before.
"""

from __future__ import annotations

import mmap


def page_aligned(size: int) -> memoryview:
    """A writable ``size``-byte buffer that starts on a page boundary (zero-filled, faulted in on
    first use: an untouched buffer costs no memory)."""
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]
