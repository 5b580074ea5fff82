"""MorphNet's regularization term and effective cost, written once over a small tensor backend.

The same expression runs in numpy (`NumpyBackend`: the float64 reference behind
`Regularizer.evaluate`), as ONNX nodes (`rewrite.training.builder.Builder`, for
onnxruntime-training's gradient builder) and in torch (`onnx_morph.torch`), so a new source kind
or resource is one change here. The steps:

1. a per-channel vector per source parameter (|gamma|, a weight slice's group-lasso norm, or a
   gate's probability sigmoid(logit)), concatenated with one zero;
2. per class, its sources gathered and combined: max (alive = OR), or for gates the probability
   that one is open, 1 - prod(1 - p);
3. alive = (vector above the threshold) or fixed, a step without gradient;
4. `CostTerms`' polynomials in the rows' alive counts A and summed vectors R, per op the larger of
   compute and memory time for latency, summed over the ops.

A backend's `key` names a constant so that a backend may cache it (torch keeps it on the device
between steps): a key always comes with the same value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, Generic, Protocol, Sequence, TypeVar

import numpy as np

from onnx_morph.costs.terms import COEFFICIENTS, CostTerms

if TYPE_CHECKING:
    from onnx_morph.rewrite.training.regularizer import Regularizer, SourceParam

T = TypeVar("T")
# Keeps the gradient of a weight slice's RMS finite when the whole slice is zero.
RMS_EPSILON = 1e-12
# Keeps the logistic noise log(u) - log(1 - u) finite.
NOISE_EPSILON = 1e-6
# Kinds whose alive test includes the threshold (MorphNet's gate probabilities: p >= 0.1).
INCLUSIVE_KINDS = ("gates",)
SIDES = ("in", "out")


class Backend(Protocol[T]):
    """The tensor operations the term needs; float tensors are the backend's float type."""

    def constant(self, key: str, value: np.ndarray) -> T:
        """A float, int64 or bool constant (by `value`'s dtype kind)."""

    def gather(self, x: T, key: str, index: np.ndarray) -> T:
        """x[index] along axis 0, `index` an int64 constant."""

    def row_sums(self, x: T, key: str, matrix: np.ndarray) -> T:
        """x @ matrix.T over x's last axis, `matrix` holding counts: per row of it, a segment sum."""

    def add(self, x: T, y: T) -> T: ...

    def sub(self, x: T, y: T) -> T: ...

    def mul(self, x: T, y: T) -> T: ...

    def scale(self, x: T, factor: float) -> T: ...

    def abs(self, x: T) -> T: ...

    def sqrt(self, x: T) -> T: ...

    def sigmoid(self, x: T) -> T: ...

    def flatten(self, x: T) -> T: ...

    def channel_slices(self, x: T, axis: int, channels: int) -> T:
        """(channels, -1): the slices of x along `axis`, one per row."""

    def mean_rows(self, x: T) -> T:
        """The mean over axis 1 of a 2-D x."""

    def concat(self, xs: list[T]) -> T: ...

    def maximum(self, xs: list[T]) -> T:
        """Elementwise max; ties share the gradient (onnxruntime's Max, torch's amax, MorphNet's reduce_max)."""

    def at_least(self, x: T, y: T, inclusive: bool) -> T:
        """x >= y (or x > y), a bool tensor without gradient."""

    def either(self, x: T, y: T) -> T:
        """Logical or of bool tensors."""

    def as_float(self, x: T) -> T: ...

    def select(self, condition: T, x: T, y: T) -> T:
        """x where `condition` (bool) holds, else y."""

    def total(self, x: T) -> T:
        """The sum of all elements, rank 0."""

    def uniform(self, like: T, size: int, low: float, high: float) -> T:
        """A fresh Uniform(low, high) sample of `size` elements in `like`'s float type and place."""

    def log(self, x: T) -> T: ...

    def div(self, x: T, y: T) -> T: ...

    def detached(self, x: T) -> T:
        """x's value, through which no gradient flows."""


@dataclass(frozen=True)
class CostArrays:
    """The numpy constants of `CostTerms`' polynomials, computed once per regularizer."""

    counts: dict[str, np.ndarray]  # side -> (rows, classes + 1)
    coefficients: dict[str, np.ndarray]  # name -> (parts, rows)
    row_nodes: np.ndarray  # (nodes, rows)
    parts: int
    present: frozenset[str]  # the coefficients that are not all zero

    @classmethod
    def of(cls, terms: CostTerms) -> CostArrays:
        coefficients = {name: terms.coefficients(name) for name in COEFFICIENTS}
        return cls({side: terms.counts(side) for side in SIDES}, coefficients, terms.row_nodes(), terms.parts,
                   frozenset(name for name, values in coefficients.items() if values.any()))


@dataclass(frozen=True)
class Term(Generic[T]):
    """The term's values: `vector` and `alive` (0/1 floats) per class plus the fixed class."""

    regularization: T
    cost: T
    vector: T
    alive: T


def regularization_term(backend: Backend[T], spec: Regularizer, params: Sequence[T]) -> Term[T]:
    """The regularization value and effective cost for `params`, one tensor per `spec.sources`."""
    vector = combined(backend, spec, params)
    alive = backend.as_float(alive_mask(backend, spec, vector))
    cost, regularization = cost_and_regularization(backend, spec.polynomial, alive, vector)
    return Term(regularization, cost, vector, alive)


def source_values(backend: Backend[T], spec: Regularizer, params: Sequence[T]) -> T:
    """Every source's per-channel regularization values, laid end to end (in `spec.sources` order).

    The elementwise kinds apply their function once to the concatenation (one op, not one per source).
    """
    if spec.kind == "gamma":
        return backend.abs(backend.concat([backend.flatten(x) for x in params]))
    if spec.kind == "gates":
        logits = [backend.scale(x, spec.gate(s.param).logit_scale) for s, x in zip(spec.sources, params)]
        return backend.sigmoid(backend.concat(logits))
    return backend.concat([_group_lasso(backend, spec, s, x) for s, x in zip(spec.sources, params)])


def _group_lasso(backend: Backend[T], spec: Regularizer, source: SourceParam, x: T) -> T:
    """l1_fraction * mean|slice| + (1 - l1_fraction) * RMS(slice) per channel slice."""
    slices = backend.channel_slices(x, source.axis, source.channels)
    square_mean = backend.mean_rows(backend.mul(slices, slices))
    rms = backend.sqrt(backend.add(square_mean, backend.constant("epsilon", np.array(RMS_EPSILON))))
    if spec.l1_fraction == 0:
        return rms
    l1 = backend.mean_rows(backend.abs(slices))
    return backend.add(backend.scale(l1, spec.l1_fraction), backend.scale(rms, 1 - spec.l1_fraction))


def combined(backend: Backend[T], spec: Regularizer, params: Sequence[T]) -> T:
    """Per class (plus the fixed class), its sources combined: 1 - prod(1 - p) for gates, else max."""
    values = backend.concat([source_values(backend, spec, params), backend.constant("zero", np.zeros(1))])
    rows = [backend.gather(values, f"gather_{j}", row) for j, row in enumerate(spec.gather)]
    if spec.kind != "gates":
        return backend.maximum(rows)
    one = backend.constant("one", np.array(1.0))
    closed = reduce(backend.mul, [backend.sub(one, row) for row in rows])
    return backend.sub(one, closed)


def alive_mask(backend: Backend[T], spec: Regularizer, vector: T) -> T:
    """Per class, above the threshold or fixed (bool)."""
    threshold = backend.constant("threshold", np.array(spec.threshold))
    above = backend.at_least(vector, threshold, spec.kind in INCLUSIVE_KINDS)
    return backend.either(above, backend.constant("fixed", spec.fixed))


def cost_and_regularization(backend: Backend[T], polynomial: CostArrays, alive: T, vector: T) -> tuple[T, T]:
    """(cost, regularization): MorphNet's linearized resource function of per-class alive flags
    (0/1 floats) and regularization values, the fixed class last."""
    a_in, a_out = (backend.row_sums(alive, f"counts_{s}", polynomial.counts[s]) for s in SIDES)
    r_in, r_out = (backend.row_sums(vector, f"counts_{s}", polynomial.counts[s]) for s in SIDES)
    cross = backend.add(backend.mul(a_in, r_out), backend.mul(a_out, r_in))
    cost = _polynomial(backend, polynomial, [
        ("bilinear", [a_in, a_out]), ("in_linear", [a_in]), ("out_linear", [a_out]), ("constant", [])])
    regularization = _polynomial(backend, polynomial, [
        ("bilinear", [cross]), ("in_linear", [r_in]), ("out_linear", [r_out]), ("depthwise", [r_in])])
    if polynomial.parts == 1:
        return backend.total(cost), backend.total(regularization)
    return _roofline(backend, polynomial, cost, regularization)


def _polynomial(backend: Backend[T], polynomial: CostArrays, monomials: list[tuple[str, list[T]]]) -> T:
    """sum of coefficient * prod(factors) over the monomials whose coefficients are not all zero;
    shape (parts, rows)."""
    terms = []
    for name, factors in monomials:
        if name in polynomial.present:
            coefficient = backend.constant(f"coefficient_{name}", polynomial.coefficients[name])
            terms.append(reduce(backend.mul, factors, coefficient))
    if not terms:
        return backend.constant("zeros", np.zeros_like(polynomial.coefficients["bilinear"]))
    return reduce(backend.add, terms)


def _roofline(backend: Backend[T], polynomial: CostArrays, cost: T, regularization: T) -> tuple[T, T]:
    """Per op, the larger of compute and memory time, regularized through that one."""
    per_node = [backend.row_sums(x, "row_nodes", polynomial.row_nodes) for x in (cost, regularization)]
    parts = [[backend.gather(x, f"part_{p}", np.array(p)) for p in (0, 1)] for x in per_node]
    compute_bound = backend.at_least(*parts[0], inclusive=True)
    return tuple(backend.total(backend.select(compute_bound, compute, memory)) for compute, memory in parts)


def sampled_gate_mask(backend: Backend[T], logits: T, size: int, temperature: float, straight_through: bool) -> T:
    """A probabilistic gate's training mask: sigmoid((logits + log u - log(1 - u)) / temperature),
    u ~ Uniform; with `straight_through` the forward value is (mask > 0.5) and the gradient the soft
    mask's."""
    u = backend.uniform(logits, size, NOISE_EPSILON, 1.0 - NOISE_EPSILON)
    odds = backend.div(u, backend.sub(backend.constant("one", np.array(1.0)), u))
    mask = backend.sigmoid(backend.scale(backend.add(logits, backend.log(odds)), 1.0 / temperature))
    if not straight_through:
        return mask
    hard = backend.as_float(backend.at_least(mask, backend.constant("half", np.array(0.5)), inclusive=False))
    return backend.add(hard, backend.sub(mask, backend.detached(mask)))


def open_gate_mask(backend: Backend[T], logits: T) -> T:
    """The eval mask of a gate: 1 where its logit is positive (the gate more likely open than not)."""
    return backend.as_float(backend.at_least(logits, backend.constant("zero", np.array(0.0)), inclusive=False))


class OperatorBackend:
    """The operations numpy arrays and torch tensors spell alike (operators and shared methods)."""

    def add(self, x, y):
        return x + y

    def sub(self, x, y):
        return x - y

    def mul(self, x, y):
        return x * y

    def div(self, x, y):
        return x / y

    def scale(self, x, factor: float):
        return x * factor

    def abs(self, x):
        return abs(x)

    def flatten(self, x):
        return x.reshape(-1)

    def mean_rows(self, x):
        return x.mean(1)

    def at_least(self, x, y, inclusive: bool):
        return x >= y if inclusive else x > y

    def either(self, x, y):
        return x | y

    def total(self, x):
        return x.sum()


class NumpyBackend(OperatorBackend):
    """The float64 reference."""

    def constant(self, key: str, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        return value.astype(np.float64) if value.dtype.kind == "f" else value

    def gather(self, x: np.ndarray, key: str, index: np.ndarray) -> np.ndarray:
        return x[index]

    def row_sums(self, x: np.ndarray, key: str, matrix: np.ndarray) -> np.ndarray:
        return x @ matrix.T

    def sqrt(self, x):
        return np.sqrt(x)

    def sigmoid(self, x):
        return 1.0 / (1.0 + np.exp(-x))

    def channel_slices(self, x, axis: int, channels: int):
        return np.moveaxis(x, axis, 0).reshape(channels, -1)

    def concat(self, xs):
        return np.concatenate(xs)

    def maximum(self, xs):
        return reduce(np.maximum, xs)

    def as_float(self, x):
        return np.asarray(x, dtype=np.float64)

    def select(self, condition, x, y):
        return np.where(condition, x, y)

    def uniform(self, like, size: int, low: float, high: float):
        return np.random.default_rng().uniform(low, high, size)

    def log(self, x):
        return np.log(x)

    def detached(self, x):
        return x
