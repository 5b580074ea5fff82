"""`prune`: choose the dead channels, remove them, verify the result."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import onnx

from onnx_morph.costs import Totals, op_costs, totals_of
from onnx_morph.costs.measured import LatencyTable, load_table
from onnx_morph.graph import ChannelGraph, build_channel_graph, load_model
from onnx_morph.graph.dependence import input_dependence
from onnx_morph.graph.load import check_model
from onnx_morph.rewrite.surgery.calibrate import calibrated, has_batchnorm
from onnx_morph.rewrite.surgery.choose import choose
from onnx_morph.rewrite.surgery.criteria import Budget, Criterion, check_criterion
from onnx_morph.rewrite.surgery.latency import LatencyModel, parse_latency_target
from onnx_morph.rewrite.surgery.surgery import (Surgery, keep_masks, probed_tensors, remove_channels,
                                                removed_channel_values)
from onnx_morph.rewrite.surgery.verify import (Deviation, deviation, input_notes, masked_original, model_file,
                                               probe_inputs, random_inputs, run, with_outputs)

# Removed channels' constants are measured on PROBE_SAMPLES probe inputs (of PROBE_SEED); the result
# is verified on VERIFY_SAMPLES random inputs of VERIFY_SEED, which decided nothing.
PROBE_SAMPLES, PROBE_SEED = 4, 24301
VERIFY_SAMPLES, VERIFY_SEED = 2, 0


@dataclass(frozen=True)
class LayerWidth:
    node: str
    op_type: str
    before: int
    after: int


@dataclass
class PruneResult:
    model: onnx.ModelProto
    before: Totals
    after: Totals
    removed_channels: int
    widths: list[LayerWidth]
    masked_deviation: Deviation | None
    original_deviation: Deviation | None
    notes: list[str] = field(default_factory=list)
    alive: np.ndarray | None = field(default=None, repr=False)
    latency: LatencyCheck | None = None
    # `model`'s protobuf bytes as verified, which prune_file writes; None once `model` may differ from them.
    serialized: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class LatencyCheck:
    """The table's prediction for the original and the pruned model, and both measured now, in turns."""

    table: str
    description: str
    target_s: float | None
    predicted_before: float
    predicted_after: float
    measured_before: float | None  # medians
    measured_after: float | None
    fastest_before: float | None = None  # fastest runs
    fastest_after: float | None = None


def prune(
    model: str | os.PathLike | onnx.ModelProto,
    criterion: Criterion,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    fold_constants: bool = True,
    verify: bool = True,
    calibration: Sequence[np.ndarray] | Callable[[tuple[int, ...]], Sequence[np.ndarray]] | None = None,
    latency_table: str | os.PathLike | LatencyTable | None = None,
    provider: str | None = None,
    measure: bool = True,
) -> PruneResult:
    """Remove the channels `criterion` finds dead from every prunable group: a `Threshold`, a `Mask`
    or a `Budget` (criteria.py); every group keeps at least one channel.

    With `fold_constants`, the constant a removed channel
    holds (beta after BatchNorm) is folded into the consumer's bias where that is exact (Gemm,
    unpadded Conv), when the channel is proven independent of the inputs or equal on four probe
    inputs; `verify` compares the result with the original in onnxruntime on fresh random inputs
    that decided nothing (integer inputs: ids below the length of the table they index, 0/1 where
    nothing bounds them, with a note). A constant that
    cannot be folded, or a removed channel that was small but not dead, shifts the next BatchNorm's
    input: with `calibration` (input batches, e.g. 20 training batches, or a function of the model's
    input shape that returns them, such as a dataset resized to fit) the pruned model's BatchNorm
    statistics are measured on them, which absorbs the shift (the deviations are the surgery's,
    before calibration).

    `Budget(latency=...)` prunes to the latency that `latency_table` (written by `onnx-morph profile`)
    predicts; with any criterion, a table makes the result carry the predicted latency before and after
    and, with `measure`, both models timed now on the table's provider, threads and batch (`provider`,
    when given, must be the table's).
    """
    check_criterion(criterion, latency_table)
    graph = build_channel_graph(load_model(model, input_shapes))
    table = None
    if latency_table is not None:
        table = latency_table if isinstance(latency_table, LatencyTable) else load_table(latency_table)
        table.check(graph, provider)
    alive, notes = choose(graph, criterion, table, measure)
    operated = _operate(graph, alive, fold_constants, verify, notes)
    pruned = _calibrated(graph, operated, calibration, notes)
    target = criterion.latency if isinstance(criterion, Budget) else None
    latency = None if table is None else _latency_check(graph, table, alive, pruned, target, measure)
    return _result(graph, alive, operated, pruned, notes, latency)


@dataclass
class _Operated:
    """The surgery's result and how it was verified; `serialized` is the pruned model's protobuf
    bytes, encoded once to be checked, run and written (None past protobuf's 2 GB limit)."""

    surgery: Surgery
    serialized: bytes | None
    masked_deviation: Deviation | None = None
    original_deviation: Deviation | None = None


def _operate(graph: ChannelGraph, alive: np.ndarray, fold_constants: bool, verify: bool,
             notes: list[str]) -> _Operated:
    """Remove the dead channels, then check the result with onnx's checker and, with `verify`, run it
    against the original in onnxruntime. Surgery edits the loaded model, whose weights stay in the
    file, and each model is encoded once with its weights copied in (LoadedModel.encoded_parts) and
    handed to onnxruntime as a file (model_file): what the check costs is the runs, not decoding,
    encoding and copying the weights over and over."""
    masks = keep_masks(graph, alive)
    probes = probed_tensors(graph, masks) if fold_constants else []
    parts = graph.model.encoded_parts(appendix=with_outputs(graph, probes))  # one session: probes and runs
    small = parts is not None
    with model_file(parts) as original:
        removed, original_runs, fresh = _probe_and_run(graph, original, probes if small else [], masks,
                                                        small and verify)
    del parts
    surgery = remove_channels(graph, alive, graph.model.model, removed, deferred=True)
    operated = _Operated(surgery, graph.model.encoded(surgery.model, arrays=surgery.arrays) if small else None)
    if not small:
        surgery.model = graph.model.materialized(surgery.model, surgery.arrays)
        notes.append("over 2 GB: the checker and onnxruntime verification were skipped")
        return operated
    surgery.model, surgery.arrays = onnx.ModelProto.FromString(operated.serialized), {}
    check_model(surgery.model, operated.serialized)
    if verify:
        notes.extend(input_notes(graph))
        with model_file([operated.serialized]) as pruned:
            pruned_runs = run(graph, pruned, fresh)
        with model_file(graph.model.encoded_parts(masked_original(graph, graph.model.model, masks,
                                                                  surgery.folded))) as masked:
            masked_runs = run(graph, masked, fresh)
        operated.masked_deviation = deviation(masked_runs, pruned_runs)
        operated.original_deviation = deviation(original_runs, pruned_runs)
    return operated


def _result(graph: ChannelGraph, alive: np.ndarray, operated: _Operated, pruned: onnx.ModelProto, notes: list[str],
            latency: LatencyCheck | None) -> PruneResult:
    after = totals_of(op_costs(graph, alive))
    return PruneResult(
        model=pruned,
        before=totals_of(op_costs(graph, np.ones(graph.num_classes, dtype=bool))),
        after=replace(after, params=after.params + operated.surgery.new_parameters),
        removed_channels=int((~alive).sum()),
        widths=layer_widths(graph, alive),
        masked_deviation=operated.masked_deviation,
        original_deviation=operated.original_deviation,
        notes=notes,
        alive=alive,
        latency=latency,
        serialized=operated.serialized,
    )


def _calibrated(graph: ChannelGraph, operated: _Operated, calibration, notes: list[str]) -> onnx.ModelProto:
    """The pruned model with BatchNorm statistics measured on `calibration`, or a note on why not."""
    pruned, original_deviation = operated.surgery.model, operated.original_deviation
    if calibration is not None and not has_batchnorm(pruned):
        notes.append("no BatchNorm to calibrate")
    elif calibration is not None:
        if callable(calibration):
            calibration = calibration(next(iter(graph.model.input_shapes.values())))
        pruned = calibrated(pruned, calibration)
        operated.serialized = None  # the verified bytes are the model's before calibration
        notes.append(f"BatchNorm statistics measured on {sum(len(b) for b in calibration)} calibration inputs")
    elif _shifts_batchnorm(pruned, original_deviation):
        notes.append(f"the pruned model differs from the original (max relative {original_deviation.max_rel:.2g}) "
                     "and its BatchNorm statistics are the original's: give calibration inputs (calibration=, "
                     "--calibrate) or fine-tune")
    return pruned


def _probe_and_run(
    graph: ChannelGraph, original: bytes | str | None, probes: list[str], masks: dict[str, np.ndarray], verify: bool,
) -> tuple[dict[str, np.ndarray], list[list[np.ndarray]], list[dict[str, np.ndarray]]]:
    """The constants of removed channels in the `probes` tensors, and the original's outputs on fresh
    inputs for verification, in one onnxruntime session of the `original` model's bytes or file (which
    have the probes as extra outputs). One probe run tells the value of a channel proven independent of the
    inputs (input_dependence) and rules out one that varies over positions; any other removed channel
    takes PROBE_SAMPLES runs on probe_inputs. Verification runs on inputs of another seed, which
    decided nothing."""
    fresh = random_inputs(graph, samples=VERIFY_SAMPLES, seed=VERIFY_SEED) if verify else []
    if not probes:
        return {}, run(graph, original, [], plain=fresh) if fresh else [], fresh
    proven = {t: ~v for t, v in input_dependence(graph).items() if t in probes}
    outputs = len(graph.model.graph.output)
    feeds = probe_inputs(graph, PROBE_SAMPLES, seed=PROBE_SEED)

    def samples(runs) -> dict[str, list[np.ndarray]]:
        return {t: [r[outputs + i] for r in runs] for i, t in enumerate(probes)}

    def undecided(first) -> list[dict[str, np.ndarray]]:
        settled = removed_channel_values(graph, masks, samples(first), {t: np.ones_like(p) for t, p in proven.items()})
        unsettled = any((~masks[t] & ~proven[t] & (settled[t] != 0)).any() for t in probes)
        return feeds[1:] if unsettled else []

    runs = run(graph, original, feeds[:1], probes, then=undecided, plain=fresh)
    probed = runs[:len(runs) - len(fresh)]
    return removed_channel_values(graph, masks, samples(probed), proven), runs[len(probed):], fresh


def _latency_check(graph: ChannelGraph, table: LatencyTable, alive: np.ndarray, pruned: onnx.ModelProto, target,
                   measure: bool) -> LatencyCheck:
    from onnx_morph.rewrite.surgery.timing import measure_as_table

    model = LatencyModel(graph, table)
    medians: list[float | None] = [None, None]
    fastest: list[float | None] = [None, None]
    if measure:
        both = measure_as_table(graph, table, [graph.model.materialized(), pruned])
        medians, fastest = [m.median for m in both], [m.fastest for m in both]
    return LatencyCheck(table.source, table.description,
                        None if target is None else parse_latency_target(target, table),
                        model.predict(np.ones_like(alive)), model.predict(alive), *medians, *fastest)


def _shifts_batchnorm(model: onnx.ModelProto, original: Deviation | None) -> bool:
    return original is not None and original.max_rel > 1e-3 and has_batchnorm(model)


def layer_widths(graph: ChannelGraph, alive: np.ndarray) -> list[LayerWidth]:
    """Each weighted layer's output width before and after (`alive` may count copies)."""
    widths = []
    for name, relation in graph.relations.items():
        if relation.geometry is None:
            continue
        classes = graph.classes(relation.geometry.output)
        if classes is None:
            continue
        widths.append(LayerWidth(name, graph.nodes[name].op_type, int(classes.size), int(alive[classes].sum())))
    return widths


def prune_file(source: str | os.PathLike, output: str | os.PathLike, criterion: Criterion,
               **options) -> PruneResult:
    """prune() and an atomic save; the input file is never overwritten."""
    from onnx_morph.rewrite.surgery.save import refuse_overwrite, save_model

    refuse_overwrite(output, source)  # before the work, not only at the write
    result = prune(source, criterion, **options)
    save_model(result.model, output, source=source, serialized=result.serialized)
    return result
