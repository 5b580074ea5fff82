"""Timing models in onnxruntime: one runtime configuration (`Timing`: provider, threads, batch, runs)
and whole models timed in turns (`measure_models`), as `profile` measures a latency table and as
prune checks the table's choice against the runtime."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_morph.errors import OptionError
from onnx_morph.rewrite.surgery.verify import onnxruntime, random_feed, session_options

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class Timing:
    """How one runtime configuration is timed."""

    provider: str = "cpu"
    threads: int = 2
    batch: int = 1
    warmup: int = 2
    repeats: int = 5
    min_seconds: float = 0.02  # keep running past `repeats` until this much time is spent (at most 4x repeats)

    def session(self, model: onnx.ModelProto | bytes):
        """An onnxruntime session: all graph optimizations, `threads` intra-op threads, worker spinning off
        (timings on a shared machine then do not depend on idle cores)."""
        ort = onnxruntime()
        options = session_options(ort)
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return ort.InferenceSession(data, options, providers=[PROVIDERS[self.provider]])

    def time(self, session, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
        """(median, median absolute deviation) in seconds of `session.run`."""
        times = self.runs(session, feeds)
        median = statistics.median(times)
        return median, statistics.median(abs(t - median) for t in times)

    def runs(self, session, feeds: dict[str, np.ndarray]) -> list[float]:
        """Seconds of each timed run, after the warm-up runs."""
        for _ in range(self.warmup):
            session.run(None, feeds)
        times: list[float] = []
        while len(times) < self.repeats or (sum(times) < self.min_seconds and len(times) < 4 * self.repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return times


def check_timing(timing: Timing) -> None:
    if timing.provider not in PROVIDERS:
        raise OptionError(f"unknown provider '{timing.provider}': use one of {', '.join(PROVIDERS)}")
    if timing.threads < 1 or timing.batch < 1:
        raise OptionError(f"`threads` and `batch` must be at least 1, not {timing.threads} and {timing.batch}")
    ort = onnxruntime()
    if PROVIDERS[timing.provider] not in ort.get_available_providers():
        raise OptionError(f"provider '{timing.provider}' is not available in this onnxruntime "
                          f"({', '.join(ort.get_available_providers())})")


@dataclass(frozen=True)
class Measurement:
    """Seconds per run of a whole model: median, median absolute deviation, and the fastest run (the least
    disturbed by other processes on a busy machine)."""

    median: float
    mad: float
    fastest: float


def measure_models(models: list[onnx.ModelProto], input_shapes: dict[str, tuple[int, ...]], dtypes: dict[str, int],
                   timing: Timing, rounds: int = 5) -> list[Measurement]:
    """Each model timed on the same random inputs, in turns (a few runs of each per round) so that load
    changing over time hits them alike."""
    feeds = random_feed(input_shapes, dtypes, np.random.default_rng(0))
    sessions = [timing.session(m) for m in models]
    chunk = Timing(timing.provider, timing.threads, timing.batch, warmup=0, repeats=2, min_seconds=0.1)
    times: list[list[float]] = [[] for _ in models]
    for session in sessions:
        Timing(warmup=3, repeats=3, min_seconds=0.3).runs(session, feeds)  # warm: allocations, caches, clocks
    for _ in range(rounds):
        for index, session in enumerate(sessions):
            times[index].extend(chunk.runs(session, feeds))
    results = []
    for series in times:
        median = statistics.median(series)
        results.append(Measurement(median, statistics.median(abs(t - median) for t in series), min(series)))
    return results


def measure_as_table(graph, table, models: list[onnx.ModelProto]) -> list[Measurement]:
    """`models` (variants of `graph`'s model) timed in turns as `table` was measured: its provider,
    threads and batch."""
    shapes = {name: (table.batch, *shape[1:]) for name, shape in graph.model.input_shapes.items()}
    return measure_models(models, shapes, graph.model.dtypes, Timing(table.provider, table.threads, table.batch))
