"""Formatting shared by the benchmark scripts."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from contextlib import contextmanager


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def print_targets(targets: list[list[str]], busy_hint: str = "") -> None:
    """The load average (benchmarks on a busy machine inflate wall times) and the target table."""
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    print(f"\nload average at the end: {load_average()}" + (
        f"  (above {os.cpu_count()} CPUs: other processes compete, wall times are inflated{busy_hint})" if busy else ""))
    print("\nTARGETS")
    print(table(targets, ["target", "measured", "result"]))


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    """The same rows as `table`, as a GitHub markdown table (for docs/)."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


@contextmanager
def work_dir(path: str | None, prefix: str):
    """`path` (created if missing, kept), or a temporary folder removed afterwards."""
    folder = pathlib.Path(path or tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if path is None:
            shutil.rmtree(folder, ignore_errors=True)
