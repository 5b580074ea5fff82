"""`prune`: choose the dead channels, remove them, verify the result."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import onnx

from onnx_morph.costs import Totals, op_costs, total_cost, totals_of
from onnx_morph.costs.measured import LatencyTable, load_table
from onnx_morph.errors import OptionError
from onnx_morph.graph import ChannelGraph, build_channel_graph, load_model, source_strength
from onnx_morph.graph.dependence import input_dependence
from onnx_morph.graph.load import check_model
from onnx_morph.rewrite.surgery import select
from onnx_morph.rewrite.surgery.calibrate import calibrated, has_batchnorm
from onnx_morph.rewrite.surgery.latency import LatencyModel, by_latency, measured_to_target, parse_latency_target
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
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    gamma_threshold: float | None = None,
    weight_threshold: float | None = None,
    masks: dict | str | os.PathLike | None = None,
    target_flops: float | None = None,
    target_params: float | None = None,
    ratio: float | None = None,
    round_to: int = 1,
    min_keep: float = 0.1,
    fold_constants: bool = True,
    verify: bool = True,
    calibration: Sequence[np.ndarray] | Callable[[tuple[int, ...]], Sequence[np.ndarray]] | None = None,
    target_latency: float | str | None = None,
    latency_table: str | os.PathLike | LatencyTable | None = None,
    provider: str | None = None,
    measure: bool = True,
) -> PruneResult:
    """Remove dead channels from every prunable group.

    Exactly one criterion: a gamma or weight threshold, a mask document (as written by
    `analyze --structure`), or a budget: target FLOPs, target parameters, or `ratio` (the fraction
    of FLOPs to keep), met by ranking channels globally by |gamma| per unit of cost saved.
    Every group keeps at least one channel; budgets also keep `min_keep` of each group's channels
    and remove channels `round_to` at a time, so widths stay multiples of it. With `fold_constants`, the constant a removed channel
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

    `target_latency` (a fraction of the measured original, or a time such as '3.2ms') prunes to the
    latency that `latency_table` (written by `onnx-morph profile`) predicts; with any criterion, a table
    makes the result carry the predicted latency before and after and, with `measure`, both models
    timed now on the table's provider, threads and batch (`provider`, when given, must be the table's).
    """
    criteria = {"gamma_threshold": gamma_threshold, "weight_threshold": weight_threshold, "masks": masks,
                "target_flops": target_flops, "target_params": target_params, "ratio": ratio,
                "target_latency": target_latency}
    _check_options(criteria, latency_table, round_to, min_keep)
    graph = build_channel_graph(load_model(model, input_shapes))
    table = None
    if latency_table is not None:
        table = latency_table if isinstance(latency_table, LatencyTable) else load_table(latency_table)
        table.check(graph, provider)
    alive, notes = _choose(graph, criteria, round_to, min_keep, table, measure)
    operated = _operate(graph, alive, fold_constants, verify, notes)
    pruned = _calibrated(graph, operated, calibration, notes)
    latency = None if table is None else _latency_check(graph, table, alive, pruned, criteria["target_latency"],
                                                        measure)
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


def _check_options(criteria: dict, latency_table, round_to: int, min_keep: float) -> None:
    given = [k for k, v in criteria.items() if v is not None]
    if len(given) != 1:
        raise OptionError("give exactly one of gamma_threshold, weight_threshold, `masks`, target_flops, "
                          f"target_params, `ratio`, target_latency (got {', '.join(given) or 'none'})")
    if criteria["target_latency"] is not None and latency_table is None:
        raise OptionError("target_latency needs latency_table (write one with `onnx-morph profile`)")
    if round_to < 1:
        raise OptionError(f"round_to must be at least 1, not {round_to}")
    if not 0 <= min_keep <= 1:
        raise OptionError(f"min_keep is a fraction of each group's channels, in [0, 1], not {min_keep}")


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
    from onnx_morph.profile import Timing, measure_models

    model = LatencyModel(graph, table)
    medians: list[float | None] = [None, None]
    fastest: list[float | None] = [None, None]
    if measure:
        shapes = {name: (table.batch, *shape[1:]) for name, shape in graph.model.input_shapes.items()}
        timing = Timing(table.provider, table.threads, table.batch)
        both = measure_models([graph.model.materialized(), pruned], shapes, graph.model.dtypes, timing)
        medians, fastest = [m.median for m in both], [m.fastest for m in both]
    return LatencyCheck(table.source, table.description,
                        None if target is None else parse_latency_target(target, table),
                        model.predict(np.ones_like(alive)), model.predict(alive), *medians, *fastest)


def _shifts_batchnorm(model: onnx.ModelProto, original: Deviation | None) -> bool:
    return original is not None and original.max_rel > 1e-3 and has_batchnorm(model)


def _choose(graph: ChannelGraph, criteria: dict, round_to: int, min_keep: float,
            table: LatencyTable | None = None, measure: bool = False) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    prunable = ~graph.class_pinned()
    if not prunable.any():
        raise OptionError(f"{graph.model.source}: no channel group is prunable (see `onnx-morph analyze` for the reasons)")
    gamma, weight, masks = criteria["gamma_threshold"], criteria["weight_threshold"], criteria["masks"]
    if gamma is not None or weight is not None or masks is not None:
        kind = "weight" if weight is not None else "gamma"
        if masks is not None:
            alive = select.by_mask_document(graph, masks)
        else:
            alive = select.by_threshold(graph, gamma, weight)
            if not alive[prunable].any():
                strength = source_strength(graph, kind)[prunable]
                best = np.max(strength[np.isfinite(strength)], initial=0.0)
                raise OptionError(f"the threshold removes every prunable channel (the strongest {kind} is {best:.4g})")
        alive, emptied = select.keep_minimum(graph, alive, kind)
        if emptied:
            notes.append(f"{len(emptied)} groups would lose every channel; each keeps its strongest one")
        return select.round_widths(graph, alive, round_to, kind), notes
    everything = np.ones(graph.num_classes, dtype=bool)
    if criteria["target_latency"] is not None:
        target = parse_latency_target(criteria["target_latency"], table)
        alive = by_latency(graph, table, target, min_keep=min_keep)
        if measure:
            alive, retargeted = measured_to_target(graph, table, target, alive, min_keep=min_keep)
            notes += retargeted
        alive, _ = select.keep_minimum(graph, alive)
        reached = LatencyModel(graph, table).predict(alive)
        if reached > target:
            notes.append(f"the latency target {1e3 * target:.4g} ms is out of reach: no further step saves time "
                         f"(predicted {1e3 * reached:.4g} ms)")
        return select.round_widths(graph, alive, round_to), notes
    if criteria["ratio"] is not None:
        ratio = criteria["ratio"]
        if not 0 < ratio <= 1:
            raise OptionError(f"`ratio` is the fraction of FLOPs to keep, in (0, 1], not {ratio}")
        budget = select.Budget("flops", ratio * total_cost(graph, everything, "flops"))
    elif criteria["target_flops"] is not None:
        budget = select.Budget("flops", _positive(criteria["target_flops"], "target_flops"))
    else:
        budget = select.Budget("params", _positive(criteria["target_params"], "target_params"))
    alive = select.by_budget(graph, budget, multiple=round_to, min_keep=min_keep)
    missed = select.budget_shortfall(graph, budget, alive)
    if missed:
        notes.append(missed)
    return alive, notes


def _positive(value: float, option: str) -> float:
    if not value > 0:
        raise OptionError(f"{option} must be positive, not {value}")
    return float(value)


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


def prune_file(source: str | os.PathLike, output: str | os.PathLike, **options) -> PruneResult:
    """prune() and an atomic save; the input file is never overwritten."""
    from onnx_morph.rewrite.surgery.save import refuse_overwrite, save_model

    refuse_overwrite(output, source)  # before the work, not only at the write
    result = prune(source, **options)
    save_model(result.model, output, source=source, serialized=result.serialized)
    return result
