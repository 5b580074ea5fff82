"""Plain-text rendering of an Analysis for the terminal."""

from __future__ import annotations

from onnx_morph.analysis import Analysis, Totals

_UNITS = {"flops": "", "params": "", "activations": "", "memory": "B", "latency": "s"}


def human(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1e6:.1f} us" if value < 1e-3 else f"{value * 1e3:.2f} ms"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}" if float(value).is_integer() else f"{value:.2f}{unit}"


def _totals_line(label: str, totals: Totals, flop_unit: str) -> str:
    parts = [
        f"{flop_unit} {human(totals.flops)}",
        f"params {human(totals.params)}",
        f"activations {human(totals.activations)}",
        f"memory {human(totals.memory_bytes, 'B')}",
    ]
    if totals.latency_s is not None:
        parts.append(f"latency {human(totals.latency_s, 's')}")
    return f"{label:<10} " + "  ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _shorten(items: list[str], keep: int = 3) -> str:
    shown = ", ".join(items[:keep])
    return shown + (f" (+{len(items) - keep})" if len(items) > keep else "")


def render(analysis: Analysis, max_ops: int | None = None) -> str:
    a = analysis
    unit = _UNITS[a.cost]
    cost_label = a.flop_unit if a.cost == "flops" else a.cost
    if a.hardware is not None:
        cost_label += f" on {a.hardware.name}"
    out = [f"model: {a.model} (opset {a.opset})",
           "inputs: " + ", ".join(f"{k}={list(v)}" for k, v in a.input_shapes.items())]
    out += [f"note: {n}" for n in a.notes]
    out += ["", _totals_line("total", a.total, a.flop_unit)]
    if a.gamma_threshold is not None or a.weight_threshold is not None:
        which = (f"gamma threshold {a.gamma_threshold}" if a.gamma_threshold is not None
                 else f"weight threshold {a.weight_threshold}")
        out.append(_totals_line("effective", a.effective, a.flop_unit) + f"   ({which})")
    measured = getattr(a.hardware, "model_seconds", None)
    if measured is not None:
        out.append(f"latency table {a.hardware.source} ({a.hardware.description}): "
                   f": the whole model measured {human(measured, 's')}, of which "
                   f"{human(a.hardware.overhead_seconds, 's')} fixed overhead; predicted here "
                   f"{human(a.effective.latency_s, 's')}")

    total_cost = a.cost_of(a.effective) or 0.0
    modules = a.graph.module_paths
    rows = []
    for op in a.ops:
        value = a.cost_of(op)
        if not value:
            continue
        share = f"{100 * value / total_cost:.1f}%" if total_cost else "-"
        rows.append([op.node, op.op_type, f"{op.in_alive}/{op.in_total}", f"{op.out_alive}/{op.out_total}",
                     human(value, unit), share] + ([modules.get(op.node, "")] if modules else []))
    shown = rows if max_ops is None else rows[:max_ops]
    out += ["", f"per-op {cost_label} ({len(rows)} ops with a nonzero cost)"]
    out += _table(["node", "type", "in alive", "out alive", cost_label, "share"] + (["module"] if modules else []),
                  shown)
    if len(shown) < len(rows):
        out.append(f"... {len(rows) - len(shown)} more (use --all-ops)")

    prunable = sum(g.prunable for g in a.groups)
    out += ["", f"channel groups: {len(a.groups)} ({prunable} prunable, "
                f"{sum(g.size for g in a.groups if g.prunable)} prunable channels)"]
    group_rows = [[str(g.id), str(g.size), str(g.alive), _shorten(g.producers or g.ops, 2),
                   "prunable" if g.prunable else "pinned: " + _shorten(g.pin_reasons, 1)] for g in a.groups]
    out += _table(["group", "size", "alive", "ops", "status"], group_rows)
    if a.unknown_ops:
        out += ["", "unknown op types (their channels are pinned):"]
        out += [f"  {op}: {_shorten(nodes)}" for op, nodes in sorted(a.unknown_ops.items())]
    return "\n".join(out)


def _resized(headline: str, result) -> list[str]:
    """Before/after costs and per-layer widths of a prune or expand result."""
    b, a = result.before, result.after
    ratio = lambda new, old: f"{100 * new / old:.1f}%" if old else "-"  # noqa: E731
    out = [headline,
           f"FLOPs   {human(b.flops):>9} -> {human(a.flops):>9}  ({ratio(a.flops, b.flops)})",
           f"params  {human(b.params):>9} -> {human(a.params):>9}  ({ratio(a.params, b.params)})"]
    out += [f"note: {n}" for n in result.notes]
    changed = [w for w in result.widths if w.after != w.before]
    out += ["", f"layer widths ({len(changed)} of {len(result.widths)} changed)"]
    out += _table(["node", "type", "before", "after"],
                  [[w.node, w.op_type, str(w.before), str(w.after)] for w in result.widths])
    return out


def render_expand(result, output: str) -> str:
    """An ExpandResult: the multiplier found, costs against the budget, widths."""
    out = _resized(f"wrote {output}: width multiplier {result.multiplier:.4g}, fresh weights", result)
    spent = result.after.flops if result.budget.resource == "flops" else result.after.params
    out += ["", f"{result.budget.resource} budget {human(result.budget.target)}: uses {human(spent)} "
                f"({100 * spent / result.budget.target:.1f}%); train it from scratch"]
    return "\n".join(out)


def render_prune(result, output: str) -> str:
    """Before/after costs, per-layer widths and the verification of a PruneResult."""
    out = _resized(f"wrote {output}: removed {result.removed_channels} channels", result)
    out.append("")
    if result.masked_deviation is None:
        out.append("verification: skipped")
    else:
        m, o = result.masked_deviation, result.original_deviation
        out.append(f"verification against the original with the removed channels masked ({m.samples} fresh random inputs): "
                   f"max abs {m.max_abs:.3g}, max rel {m.max_rel:.3g}")
        out.append(f"difference from the unpruned original: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}")
    if result.latency is not None:
        out += ["", *_latency_lines(result.latency)]
    return "\n".join(out)


def _latency_lines(check) -> list[str]:
    """Predicted (by the table) and measured latency of the original and the pruned model."""
    ratio = lambda new, old: f"{100 * new / old:.1f}%" if old else "-"  # noqa: E731
    lines = [f"latency ({check.description}, table {check.table}):",
             f"  predicted {human(check.predicted_before, 's'):>9} -> {human(check.predicted_after, 's'):>9}  "
             f"({ratio(check.predicted_after, check.predicted_before)})"
             + (f", target {human(check.target_s, 's')}" if check.target_s is not None else "")]
    if check.measured_before is not None:
        lines.append(f"  measured  {human(check.measured_before, 's'):>9} -> {human(check.measured_after, 's'):>9}  "
                     f"({ratio(check.measured_after, check.measured_before)}), medians, both timed now in turns; "
                     f"fastest runs {human(check.fastest_before, 's')} -> {human(check.fastest_after, 's')} "
                     f"({ratio(check.fastest_after, check.fastest_before)})")
    return lines


def render_loop(result) -> str:
    """The stages of a MorphNet loop side by side, and the widths that changed."""
    first = result.stages[0]
    rows = [[s.name, f"{100 * s.accuracy:.2f}%", f"{human(s.flops)} ({s.flops / first.flops:.0%})",
             f"{human(s.params)} ({s.params / first.params:.0%})", f"{s.latency_ms:.3f} ms"] for s in result.stages]
    lines = [f"data: {result.data}"] if result.data else []
    if result.target is not None and result.total_cost:
        lines.append(f"target: {result.target / result.total_cost:.0%} of the cost")
    lines += _table(["stage", "test accuracy", "FLOPs", "params", "latency (batch 64)"], rows) + ["", "widths:"]
    lines += [f"  {w.node}: {w.before} -> {w.after}" for w in result.widths if w.before != w.after]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
