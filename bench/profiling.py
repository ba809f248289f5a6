"""Wall-clock timing with device synchronisation, and peak memory.

Peak memory is the CUDA peak allocated on a GPU. On CPU it is the block's peak resident set
above a baseline (by default the RSS at the block's start; the runner passes the RSS after
data loading): on Linux the kernel's own high-water mark (VmHWM), reset at the block's start
through /proc/self/clear_refs, so a short spike is never missed and an earlier, higher peak
of the process never hides the block's (which made the old growth figure read 0). Elsewhere
a sampling thread approximates it. Nested blocks fold their peaks into the enclosing ones.
Baselines and block starts are taken *settled* (garbage collected, freed heap handed back to the
kernel): heap that earlier work freed but the process still held would otherwise count in the
baseline and be reused by the block without any RSS growth, reading as a peak near 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from bench.device import synchronize

CPU_KIND = "cpu_peak_rss_above_baseline"  # a block in a process that ran other work before
CPU_FRESH_KIND = "cpu_rss_fresh_process"  # the same figure, in a process that runs nothing else
CUDA_KIND = "cuda_peak_allocated"
_active: list[measure] = []  # open measurements, outermost first
_runs_started = 0  # a CPU peak is only a run's own when nothing ran before it in this process


def count_run() -> None:
    """Note that a run starts in this process."""
    global _runs_started
    _runs_started += 1


def runs_in_this_process() -> int:
    return _runs_started


def memory_kind(m: Measurement, device: torch.device) -> str:
    """``m``'s memory kind: on CPU, whether this process ran nothing but the current run."""
    if device.type == "cuda" or m.kind != CPU_KIND:
        return m.kind
    return CPU_FRESH_KIND if _runs_started <= 1 else CPU_KIND


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # non-Linux fallback: the lifetime peak
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): return every free heap page to the kernel (a no-op elsewhere).
    Hand-written through ctypes: neither torch nor psutil exposes it."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


FIX_MMAP_ENV = "BENCH_FIX_MMAP_THRESHOLD"  # "1": runs fix the threshold (fix_mmap_threshold)


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its starting 128 KiB (setting it turns off its dynamic raise).

    With the raise, freeing a large block lifts the threshold (up to 32 MiB); later blocks below it
    then come from the heap, where small live objects pin freed space, so the heap ratchets up by
    an amount that depends on timing: identical Fashion-MNIST mc-dropout runs peaked at 777, 169
    and 263 MiB while predicting. With the threshold fixed every large block is its own mapping,
    returned when freed (126 and 131 MiB), but each is mapped and zeroed afresh, which made that
    prediction about 40 % slower: runs do it only when ``BENCH_FIX_MMAP_THRESHOLD=1``.
    True where glibc took it (False elsewhere: no glibc)."""
    try:
        return bool(_libc().mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def settled_rss_bytes() -> int:
    """The resident set once garbage is collected and freed heap is returned: live data only."""
    gc.collect()
    _malloc_trim()
    return current_rss_bytes()


def _high_water_mark() -> int | None:
    """The process's peak RSS since the last reset (VmHWM), or None where the kernel has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0
    kind: str = CPU_KIND


@dataclass
class measure:  # noqa: N801 - used as a context manager: `with measure(device) as m:`
    """Time a block (synchronised) and record its peak memory above ``baseline`` bytes.

    Enclosing blocks count a nested block's peak, unless it is ``separate``: a network trained
    inside a method's fit has its own cost record (``bench.record.NetworkCost``), and the fit's
    peak must not depend on whether the network came from the cache. What the separate block
    leaves allocated (the network) still counts for the enclosing ones.
    """

    device: torch.device
    baseline: int | None = None
    result: Measurement = field(default_factory=Measurement)
    interval_s: float = 0.005
    separate: bool = False

    def __enter__(self) -> Measurement:
        synchronize(self.device)
        self._peak, self._paused = 0, False
        if self.device.type == "cuda":
            self._start_cuda()
        else:
            self._start_cpu()
        if self.separate:
            for outer in self._outers():
                outer._paused = True
        _active.append(self)
        self._t0 = time.perf_counter()
        return self.result

    def _start_cuda(self) -> None:
        seen = int(torch.cuda.max_memory_allocated(self.device))
        for outer in self._outers():  # the reset below must not lose what the enclosing blocks saw
            outer._peak = max(outer._peak, seen)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.result.kind = CUDA_KIND

    def _start_cpu(self) -> None:
        mark = _high_water_mark()  # before settling: the enclosing blocks' peak so far
        settled = settled_rss_bytes()
        for outer in self._outers():  # the reset below must not lose what the enclosing blocks saw
            outer._peak = max(outer._peak, mark or 0)
        self._base = self.baseline if self.baseline is not None else settled
        self._peak = settled
        self._kernel = mark is not None and _reset_high_water_mark()
        self._stop = threading.Event()
        self._thread = None
        if not self._kernel:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            if not self._paused:
                self._peak = max(self._peak, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.result.seconds = time.perf_counter() - self._t0
        _active.remove(self)
        cuda = self.device.type == "cuda"
        if cuda:  # peak allocated during the block (includes tensors alive at entry)
            self._peak = max(self._peak, int(torch.cuda.max_memory_allocated(self.device)))
            self.result.peak_bytes = self._peak
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, current_rss_bytes(), (_high_water_mark() or 0) if self._kernel else 0)
            self.result.peak_bytes = int(max(0, self._peak - self._base))
        if not self.separate:
            for outer in self._outers():
                outer._peak = max(outer._peak, self._peak)
            return
        # Separate: restart the enclosing blocks' marks after it; what it left allocated counts.
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            left = int(torch.cuda.memory_allocated(self.device))
        else:
            _reset_high_water_mark()
            left = current_rss_bytes()
        for outer in self._outers():
            outer._peak, outer._paused = max(outer._peak, left), False

    def _outers(self) -> list[measure]:
        """The open enclosing blocks on the same kind of device (their figures share units), up to
        the innermost separate one: what runs inside a separate block is that block's alone."""
        same = [m for m in _active if m is not self and m.device.type == self.device.type]
        cut = max((i for i, m in enumerate(same) if m.separate), default=0)
        return same[cut:]
