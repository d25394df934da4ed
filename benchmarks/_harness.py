"""Timing, peak memory and table printing shared by the benchmarks.

Every benchmark runs difflayers and the anchors in one process, on the same data,
and reports the median wall time over repeats, the peak memory of one run and the
error against a reference, with ratios to each anchor.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Row:
    name: str
    seconds: float
    peak_mib: float
    error: float
    note: str = ""
    anchor: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call above what was in use before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set
    (VmHWM), reset through ``/proc/self/clear_refs`` before the call (Linux); NaN
    where that is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return math.nan
    base = _rss_kib("VmRSS")
    fn()
    return max(_rss_kib("VmHWM") - base, 0) / 1024


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """``(median seconds, peak MiB)`` of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_memory_mib(fn, device)


def format_table(title: str, rows: list[Row], reference: str) -> str:
    """Markdown table; ``x anchor`` columns give our time divided by each anchor's
    (below 1 means difflayers is faster)."""
    anchors = [r for r in rows if r.anchor]
    head = ["method", "median time (ms)", "peak mem (MiB)", f"rel. error vs {reference}"]
    head += [f"time / {a.name}" for a in anchors]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name + (f" ({r.note})" if r.note else ""), f"{1e3 * r.seconds:.2f}", f"{r.peak_mib:.2f}",
                 f"{r.error:.1e}"]
        cells += ["—" if r.anchor else f"{r.seconds / a.seconds:.2f}" for a in anchors]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> str:
    threads = torch.get_num_threads()
    cpu = os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return f"torch {torch.__version__}, {cpu} CPUs ({threads} torch threads), GPU: {gpu}"


def argument_parser(doc: str | None, *, quick_help: str = "small sizes, for a smoke test",
                    output_help: str = "also write the table to this markdown file") -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--repeats``, ``--device``, ``--quick`` and
    ``--output``; a benchmark adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output", help=output_help)
    return parser


def emit(table: str, output: str | None) -> None:
    """Print a benchmark's table and, with ``output``, also write it there."""
    print(table)
    if output:
        with open(output, "w") as f:
            f.write(table + "\n")
