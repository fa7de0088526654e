"""Helpers for the benchmark scripts: run a command and report wall time and peak memory of its process tree."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil


def run_measured(cmd: list[str], **kwargs) -> tuple[float, int, int]:
    """(seconds, peak RSS of the largest process, peak RSS summed over the process and its children)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, **kwargs)
    peak_one = peak_sum = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_one, peak_sum
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
            except psutil.NoSuchProcess:
                break
            peak_one, peak_sum = max(peak_one, max(rss)), max(peak_sum, sum(rss))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    took = time.perf_counter() - start
    stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{cmd} failed with exit code {code}")
    return took, peak_one, peak_sum


def nccid_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nccid.cli", *args]


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def spread(values: list[float], unit: str) -> str:
    """'min / median / max' of repeated measurements, so that one lucky or unlucky run is seen for what it is."""
    import statistics

    ordered = sorted(values)
    return f"min {ordered[0]:,.2f} / median {statistics.median(ordered):,.2f} / max {ordered[-1]:,.2f}{unit}"
