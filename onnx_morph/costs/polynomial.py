"""The cost polynomial, MorphNet's linearizable form, and the one place it is evaluated.

A row is one op (or one group of a grouped conv). With A the alive counts and R the summed
regularization vector over the row's input and output channels:

    cost = b * A_in * A_out + l_in * A_in + l_out * A_out + k
    reg  = b * (A_in * R_out + A_out * R_in) + l_in * R_in + l_out * R_out + dw * R_in

`dw` is non-zero only for depthwise convs, whose cost is linear in their tied channels and whose
regularizer is MorphNet's depthwise form coeff * (R_in + R_out). Latency rows have two parts,
compute and memory; an op costs the larger and is regularized through that one.

Channels that cannot die (a non-channel axis, a fixed weight dimension) point at one extra class,
`fixed`, that is always alive and never regularized. Op totals, the model's total and marginal costs
are evaluations of these rows here; the regularization term (`rewrite.training.expression`) evaluates
the same rows in numpy, as ONNX nodes and in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

COEFFICIENTS = ("bilinear", "in_linear", "out_linear", "constant", "depthwise")


@dataclass(frozen=True)
class Polynomial:
    """One op's coefficients before its split into groups, a value per part (latency: compute, memory)."""

    bilinear: tuple[float, ...] = (0.0,)
    in_linear: tuple[float, ...] = (0.0,)
    out_linear: tuple[float, ...] = (0.0,)
    constant: tuple[float, ...] = (0.0,)

    def over(self, divisor: float) -> Polynomial:
        """Every coefficient divided by `divisor` (FLOPs to seconds at a peak, bytes at a bandwidth)."""
        return Polynomial(*(tuple(v / divisor for v in values) for values in self._values()))

    def beside(self, other: Polynomial) -> Polynomial:
        """This polynomial's parts, then `other`'s."""
        return Polynomial(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[tuple[float, ...], ...]:
        return self.bilinear, self.in_linear, self.out_linear, self.constant


@dataclass(frozen=True)
class CostRow:
    node: str
    in_classes: np.ndarray
    out_classes: np.ndarray
    bilinear: tuple[float, ...]
    in_linear: tuple[float, ...]
    out_linear: tuple[float, ...]
    constant: tuple[float, ...]
    depthwise: tuple[float, ...]
    grouped: bool = False  # one group of a grouped conv: a class copied r times is r groups


def channel_classes(graph, tensor: str, axis: int) -> np.ndarray:
    """The classes of the channels along `axis` of `tensor`; `fixed` (num_classes) for each channel of
    an axis that is not a channel axis."""
    info = graph.tensors.get(tensor)
    classes = graph.axis_classes(tensor, axis) if info is not None else None
    if classes is None:
        shape = info.shape if info is not None else graph.model.shapes.get(tensor)
        return np.full(shape[axis] if shape is not None else 0, graph.num_classes, dtype=np.int64)
    return classes


def split_rows(node: str, c_in: np.ndarray, c_out: np.ndarray, groups: int, poly: Polynomial) -> list[CostRow]:
    """The rows of one op: the grouped-conv rule, written only here.

    A depthwise conv (one input channel per group) is one row whose bilinear part is linear in its
    tied channels; other grouped convs get a row per group, sharing the op's constant; an op without
    a bilinear part, or whose channels do not divide into its groups, is one row.
    """
    c_in, c_out = np.asarray(c_in, dtype=np.int64), np.asarray(c_out, dtype=np.int64)
    if groups <= 1 or c_in.size % groups or c_out.size % groups or not any(poly.bilinear):
        return [CostRow(node, c_in, c_out, *_coefficients(poly))]
    if c_in.size == groups:
        return [CostRow(node, c_in, c_out, *_coefficients(poly, depthwise=True))]
    coefficients = _coefficients(poly, share=1.0 / groups)
    return [CostRow(node, i, o, *coefficients, grouped=True)
            for i, o in zip(c_in.reshape(groups, -1), c_out.reshape(groups, -1))]


def _coefficients(poly: Polynomial, *, share: float = 1.0, depthwise: bool = False) -> tuple[tuple[float, ...], ...]:
    """A row's COEFFICIENTS (length-1 values broadcast over the parts); a depthwise row's bilinear
    coefficient becomes linear in its tied output channels."""
    parts = max(len(v) for v in poly._values())
    b, li, lo, k = (tuple(float(x) for x in v) * (parts // len(v)) for v in poly._values())
    k, zeros = tuple(x * share for x in k), (0.0,) * parts
    if depthwise:
        return zeros, li, tuple(o + x for o, x in zip(lo, b)), k, b
    return b, li, lo, k, zeros


@dataclass(frozen=True)
class CostTerms:
    """The rows of one resource; classes index the channel graph's classes, plus `fixed`."""

    resource: str
    rows: list[CostRow]
    num_classes: int
    parts: int

    @property
    def fixed(self) -> int:
        return self.num_classes

    @property
    def nodes(self) -> list[str]:
        return list(self._nodes)

    @cached_property
    def _nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(row.node for row in self.rows))

    def counts(self, side: str) -> np.ndarray:
        """(rows, classes + 1) matrix: how many of a row's input (or output) channels each class holds."""
        return self._counts[side]

    @cached_property
    def _counts(self) -> dict[str, np.ndarray]:
        counts = {side: np.zeros((len(self.rows), self.num_classes + 1)) for side in ("in", "out")}
        for i, row in enumerate(self.rows):
            np.add.at(counts["in"][i], row.in_classes, 1.0)
            np.add.at(counts["out"][i], row.out_classes, 1.0)
        return counts

    def coefficients(self, name: str) -> np.ndarray:
        """(parts, rows) array of one of COEFFICIENTS."""
        return np.array([getattr(row, name) for row in self.rows], dtype=np.float64).reshape(len(self.rows), self.parts).T

    def row_nodes(self) -> np.ndarray:
        """(nodes, rows) 0/1 matrix summing rows into their op."""
        matrix = np.zeros((len(self._nodes), len(self.rows)))
        matrix[self._layout["row_node"], np.arange(len(self.rows))] = 1.0
        return matrix

    def cost(self, alive: np.ndarray) -> float:
        """The total cost under per-class alive flags (or counts): per op the larger part, summed."""
        return float(self.node_costs(alive).max(axis=1, initial=0.0).sum())

    def per_node(self, alive: np.ndarray) -> dict[str, float]:
        """Each op's cost (the larger part of a roofline latency) under `alive`."""
        return dict(zip(self._nodes, self.node_costs(alive).max(axis=1, initial=0.0).tolist()))

    def node_costs(self, alive: np.ndarray) -> np.ndarray:
        """(nodes, parts) cost of each op. `alive` may count copies of classes (expansion): a grouped
        conv's group is one class, so a group copied r times is r groups, not one r times as wide."""
        a = np.append(alive.astype(np.float64), 1.0)
        a_in, a_out = self._sums(a)
        c = self._coefficients
        pairs = a_in * a_out / self._copies(a)
        return self._node_sums(c["bilinear"] * pairs + c["in_linear"] * a_in + c["out_linear"] * a_out + c["constant"])

    def gradient(self, alive: np.ndarray) -> np.ndarray:
        """d cost / d alive per class, through each op's larger part: to first order, what removing one
        class alone saves (or reviving it costs). A depthwise row counts as the product of its tied
        channels, dw * a_in * a_out per group, as a grouped conv's row does."""
        a = np.append(alive.astype(np.float64), 1.0)
        a_in, a_out = self._sums(a)
        layout, rows = self._layout, np.arange(len(self.rows))
        part = self.node_costs(alive).argmax(axis=1)[layout["row_node"]]
        b, li, lo, dw = (self._coefficients[name][part, rows] for name in ("bilinear", "in_linear", "out_linear", "depthwise"))
        b = b / self._copies(a)
        per_in, per_out = (b * a_out + li)[layout["in_row"]], (b * a_in + lo)[layout["out_row"]]
        size = self.num_classes + 1
        gradient = np.bincount(layout["in_index"], per_in, size) + np.bincount(layout["out_index"], per_out, size)
        for i in np.flatnonzero(dw):
            row = self.rows[i]
            multiplier = row.out_classes.size // row.in_classes.size
            np.add.at(gradient, row.in_classes, dw[i] * a[row.out_classes].reshape(-1, multiplier).sum(axis=1))
            np.add.at(gradient, row.out_classes, dw[i] * (np.repeat(a[row.in_classes], multiplier) - 1.0))
        return gradient[:-1]

    def _sums(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row, `values` summed over its input channels and over its output channels."""
        layout, n = self._layout, len(self.rows)
        return (np.bincount(layout["in_row"], values[layout["in_index"]], n),
                np.bincount(layout["out_row"], values[layout["out_index"]], n))

    def _copies(self, a: np.ndarray) -> np.ndarray:
        """Per row, how many copies of its group the alive counts hold (1 but for grouped rows)."""
        layout = self._layout
        copies = np.ones(len(self.rows))
        if layout["grouped"].any():
            np.maximum.at(copies, layout["in_row"], np.where(layout["grouped"][layout["in_row"]], a[layout["in_index"]], 1.0))
        return copies

    def _node_sums(self, per_row: np.ndarray) -> np.ndarray:
        """(parts, rows) values summed into (nodes, parts)."""
        n = len(self._nodes)
        return np.stack([np.bincount(self._layout["row_node"], part, n) for part in per_row], axis=1).reshape(n, self.parts)

    @cached_property
    def _coefficients(self) -> dict[str, np.ndarray]:
        return {name: self.coefficients(name) for name in COEFFICIENTS}

    @cached_property
    def _layout(self) -> dict[str, np.ndarray]:
        """Flat index arrays: every row's input and output classes with the row each belongs to."""
        index = {n: i for i, n in enumerate(self._nodes)}
        layout = {"row_node": np.array([index[row.node] for row in self.rows], dtype=np.int64),
                  "grouped": np.array([row.grouped for row in self.rows], dtype=bool)}
        for side in ("in", "out"):
            classes = [getattr(row, f"{side}_classes") for row in self.rows]
            layout[f"{side}_index"] = np.concatenate(classes) if classes else np.zeros(0, dtype=np.int64)
            layout[f"{side}_row"] = np.repeat(np.arange(len(classes)), [c.size for c in classes])
        return layout
