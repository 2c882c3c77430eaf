"""DataLoader workers without transparent huge pages.

Design problem: pyarrow's allocator (mimalloc) reserves its arena with ``madvise(MADV_HUGEPAGE)`` in
the training process, and the DataLoader workers forked from it inherit that advice. A worker decodes
row groups into fresh buffers and frees them; mimalloc returns freed pages to the kernel and the next
decode faults them in again, each fault zeroing a whole 2 MiB huge page. On the partition benchmark
(2 workers, 300,000 samples) that zeroing was half of every worker's CPU (1.0-1.4 s of system time
per worker against 0.3-0.4 s without huge pages), time the training process (whose arena is warm)
does not pay.

Solution: a worker that iterates a `MixtureStream` turns transparent huge pages off for its own
process (``prctl(PR_SET_THP_DISABLE)``, Linux; the training process is never touched, and the
setting dies with the worker). ``FASTMIX_DATA_WORKER_THP=keep`` leaves them on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

THP_ENV = "FASTMIX_DATA_WORKER_THP"  # "keep": leave transparent huge pages on in DataLoader workers
_PR_SET_THP_DISABLE = 41  # <linux/prctl.h>
_done = False


def disable_huge_pages() -> bool:
    """Turn transparent huge pages off for this process (once; a DataLoader worker calls it).

    Returns True when they are off after the call; False where the platform has no such switch
    (not Linux, or a kernel before 3.15), or when ``FASTMIX_DATA_WORKER_THP=keep``. Never raises."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get(THP_ENV, "").lower() == "keep":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_THP_DISABLE) failed: errno %d", ctypes.get_errno())
            return False
    except (OSError, AttributeError):
        return False
    _done = True
    return True
