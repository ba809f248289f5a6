"""Wall-clock timing with device synchronisation, and peak memory.

Peak memory means the CUDA peak allocated on a GPU, and on CPU the growth of the process's
peak resident set (ru_maxrss) over the measured block: the high-water mark cannot be reset on
Linux, so a block that stays under an earlier peak reports 0 growth. We sample RSS in a thread
as well so that the figure is the block's own peak above its starting RSS.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from bench.device import synchronize


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # non-Linux fallback: the lifetime peak
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0
    kind: str = "cpu_rss_growth"


@dataclass
class measure:  # noqa: N801 - used as a context manager: `with measure(device) as m:`
    """Time a block (synchronised) and record its peak memory."""

    device: torch.device
    result: Measurement = field(default_factory=Measurement)
    interval_s: float = 0.005

    def __enter__(self) -> Measurement:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.result.kind = "cuda_peak_allocated"
        else:
            self._base = current_rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self.result

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.result.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            # Peak allocated during the block (includes tensors alive at entry).
            self.result.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, current_rss_bytes())
            self.result.peak_bytes = int(self._peak - self._base)
