"""Peak memory of a whole process tree (a simulation and its Ray processes), sampled in a thread.

RSS counts every page a process has resident, so pages shared by several processes (torch's
libraries in every Ray worker, Ray's object store) are counted once per process; PSS
(proportional set size, Linux ``/proc/<pid>/smaps_rollup``, kernel >= 4.14) divides each
shared page among the processes that map it, so the PSS of a tree sums to what the tree
really costs. Both are summed over the root and every descendant at each sample; the peak
of the sums is reported.

psutil lists the descendants and reads RSS; when psutil is not installed on its own, the
copy Ray ships in ``ray/thirdparty_files`` is used (Ray puts the same folder on
``sys.path`` when it is imported; ``flwr[simulation]`` always brings Ray).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

#: Seconds between two samples: a Ray actor's start (a second or more of imports) is seen,
#: and a sample of ~10 processes costs well under 5 ms of one core (assumption, measured
#: on the 2-core development machine).
SAMPLE_INTERVAL_S = 0.2
#: The kernel's per-process memory summary (Linux >= 4.14).
SMAPS_ROLLUP = "/proc/{pid}/smaps_rollup"
#: ``/proc`` reports sizes in kibibytes.
KIB = 1024


def _import_psutil():
    """psutil, or Ray's bundled copy of it (see the module docstring)."""
    try:
        import psutil
    except ImportError:
        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("bench_memory needs psutil: pip install psutil") from None
        sys.path.append(str(Path(spec.submodule_search_locations[0]) / "thirdparty_files"))
        import psutil
    return psutil


psutil = _import_psutil()


def read_pss_bytes(pid: int, path_template: str = SMAPS_ROLLUP) -> int | None:
    """PSS of process ``pid`` in bytes, or None if it is gone or its summary is unreadable."""
    try:
        with open(path_template.format(pid=pid), encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * KIB
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class MemorySample:
    """One snapshot of a process tree: summed RSS and PSS, and how many processes it held."""

    rss_bytes: int
    pss_bytes: int
    processes: int


@dataclass(frozen=True)
class MemoryPeak:
    """Peaks over a sampling period (each the maximum of the per-sample sums)."""

    peak_rss_bytes: int
    peak_pss_bytes: int
    max_processes: int
    samples: int


def tree_processes(root_pid: int) -> list:
    """The root process and all its living descendants (psutil.Process objects)."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def sample_tree(root_pid: int) -> MemorySample:
    """Summed RSS and PSS of ``root_pid`` and its descendants right now.

    A process that exits between listing and reading is skipped (it holds no memory).
    """
    rss = pss = count = 0
    for process in tree_processes(root_pid):
        try:
            process_rss = process.memory_info().rss
        except psutil.Error:
            continue
        process_pss = read_pss_bytes(process.pid)
        rss += process_rss
        pss += process_rss if process_pss is None else process_pss
        count += 1
    return MemorySample(rss, pss, count)


class TreeMemorySampler:
    """Sample the memory of a process tree in a background thread until stopped.

    Parameters
    ----------
    root_pid : int
        The tree's root (e.g. a benchmark child process).
    interval_s : float
        Seconds between samples (:data:`SAMPLE_INTERVAL_S`).

    Examples
    --------
    >>> sampler = TreeMemorySampler(child.pid).start()   # doctest: +SKIP
    >>> peak = sampler.stop()                            # doctest: +SKIP
    """

    def __init__(self, root_pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.root_pid = root_pid
        self.interval_s = interval_s
        self._samples: list[MemorySample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory-sampler", daemon=True)

    def start(self) -> TreeMemorySampler:
        """Start sampling (one sample is taken at once)."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            sample = sample_tree(self.root_pid)
            if sample.processes:
                self._samples.append(sample)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> MemoryPeak:
        """Stop sampling and return the peaks (zeros if the tree was never seen alive)."""
        self._stop.set()
        self._thread.join()
        return self.peak()

    def peak(self) -> MemoryPeak:
        """Peaks of the samples taken so far."""
        samples = list(self._samples)
        return MemoryPeak(
            peak_rss_bytes=max((s.rss_bytes for s in samples), default=0),
            peak_pss_bytes=max((s.pss_bytes for s in samples), default=0),
            max_processes=max((s.processes for s in samples), default=0),
            samples=len(samples),
        )

