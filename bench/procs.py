"""What a server's processes use, read from /proc: CPU (all threads, and threads beside the hub), memory, descriptors.

A server is its root process and every descendant, found by parent pid (gunicorn's arbiter
and its workers). Adapted from ../shared/peer-bench/harness.py, so that both count alike.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(root: int) -> list[int]:
    """Return the root pid and all its descendants."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            kids.setdefault(int(stat[stat.rfind(b")") + 2:].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _ticks(path: str) -> int:
    """Return utime + stime of a process or thread, in clock ticks (0 once it is gone)."""
    try:
        with open(path, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def thread_ticks(pids: list[int]) -> dict[tuple[int, int], int]:
    """Return the CPU ticks of every thread of the processes, by (pid, tid)."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            out[(pid, int(tid))] = _ticks(f"/proc/{pid}/task/{tid}/stat")
    return out


@dataclass
class Cpu:
    """CPU seconds a process tree used: in all, and in threads other than each process's main one."""

    total: float
    # Under gevent the main thread runs the hub (every request); aspy's writer is another thread.
    side_threads: float


class CpuMeter:
    """CPU of a process tree between its start and ``read()``; processes and threads that come later count too."""

    def __init__(self, root: int):
        self.root = root
        self.pids = tree(root)
        self.start_total = sum(_ticks(f"/proc/{pid}/stat") for pid in self.pids)
        self.start_threads = thread_ticks(self.pids)

    def read(self) -> Cpu:
        """Return the CPU used since the start."""
        pids = sorted(set(self.pids) | set(tree(self.root)))
        total = sum(_ticks(f"/proc/{pid}/stat") for pid in pids) - self.start_total
        threads = thread_ticks(pids)
        side = sum(ticks - self.start_threads.get(key, 0) for key, ticks in threads.items() if key[0] != key[1])
        return Cpu(total / CLK_TCK, side / CLK_TCK)


def own_cpu(who: int) -> float:
    """Return the CPU seconds of this process (RUSAGE_SELF) or of its children it has waited for (RUSAGE_CHILDREN)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def rss_mib(pid: int) -> float:
    """Return a process's resident memory, MiB."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2 ** 20
    except OSError:
        return 0.0


def pss_mib(pid: int) -> float:
    """Return a process's proportional share of memory, MiB (shared pages split between their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fd_count(pid: int) -> int:
    """Return how many descriptors a process has open."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Peaks:
    """The highest memory and descriptor counts of a process tree seen while sampling."""

    rss: float = 0.0
    pss: float = 0.0
    fds: int = 0
    processes: int = 0
    rss_per_process: list[float] = field(default_factory=list)


class MemorySampler(threading.Thread):
    """Sample a process tree's memory every half second until ``finish()``; keep the peaks."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peaks = Peaks()
        self._done = threading.Event()

    def sample(self) -> None:
        """Take one sample now."""
        pids = tree(self.root)
        rss = [rss_mib(pid) for pid in pids]
        peaks = self.peaks
        if sum(rss) > peaks.rss:
            peaks.rss, peaks.rss_per_process = sum(rss), sorted((round(r, 1) for r in rss), reverse=True)
        peaks.pss = max(peaks.pss, sum(pss_mib(pid) for pid in pids))
        peaks.fds = max(peaks.fds, sum(fd_count(pid) for pid in pids))
        peaks.processes = max(peaks.processes, len(pids))

    def run(self) -> None:
        """Sample until stopped (an hour at most)."""
        deadline = time.monotonic() + 3600
        while not self._done.wait(self.interval) and time.monotonic() < deadline:
            self.sample()

    def finish(self) -> Peaks:
        """Stop sampling, take a last sample, and return the peaks."""
        self._done.set()
        self.join(5)
        self.sample()
        return self.peaks
