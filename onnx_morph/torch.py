"""MorphNet in a PyTorch training loop, driven by the same ONNX analysis as the rest of onnx-morph.

`MorphNetRegularizer` exports the module once, builds the channel graph and the shared
`Regularizer` (onnx_morph.rewrite.training.regularizer), maps every regularization source back to the
module's own parameters, and from then on evaluates MorphNet's term in torch on each call: the
expression the ONNX rewrite emits (onnx_morph.rewrite.training.expression, here over a torch
backend whose constants stay on the device), with no re-export.
Probabilistic gates are forward hooks on the modules that produce the gated tensors, with their
logits held by the regularizer.
`export_structure` writes the learned widths, and `prune_module` exports the trained module
and removes the dead channels with `onnx_morph.rewrite.surgery.prune`.

`import onnx_morph`, analyze, prune and expand never load torch; training does (onnxruntime-training
imports it), and so do the demo and the data module where it resizes images.
"""

from __future__ import annotations

import copy
import io
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnx_morph.errors import OnnxMorphError, OptionError
from onnx_morph.graph import ChannelGraph, build_channel_graph, load_model
from onnx_morph.rewrite.surgery.criteria import ROUND_TO
from onnx_morph.rewrite.training.gates import gate_masks
from onnx_morph.rewrite.training.expression import (OperatorBackend, combined, open_gate_mask, regularization_term,
                                                     sampled_gate_mask)
from onnx_morph.rewrite.training.regularizer import Gate, Regularizer, RegularizerOptions

__all__ = ["MorphNetRegularizer", "MorphNetOutput", "SourceBinding", "export_onnx", "export_structure",
           "prune_module", "unwrap"]

# The TorchScript exporter (torch >= 2.9) warns that it is deprecated on every call.
_EXPORTER_WARNINGS = (r"You are using the legacy TorchScript-based ONNX export", r"The feature will be removed")


@dataclass(frozen=True)
class SourceBinding:
    """One regularization source: the ONNX initializer, the module parameter it is, and the axis
    whose slices are the channels."""

    initializer: str
    parameter: str
    axis: int
    channels: int


@dataclass
class MorphNetOutput:
    """One evaluation. `regularization` is differentiable (add `strength * regularization` to the
    loss); `cost` (the effective cost: dead channels removed) and `alive` (per channel class) are
    detached tensors, so reading them per step costs no device synchronization until `.item()`."""

    regularization: torch.Tensor
    cost: torch.Tensor
    alive: torch.Tensor

    @property
    def alive_channels(self) -> int:
        return int(self.alive.sum())


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def export_onnx(module: torch.nn.Module, example_inputs: Any, path: str | os.PathLike | None = None,
                **export_options: Any) -> onnx.ModelProto:
    """The module as onnx-morph needs it: TorchScript exporter, eval mode, BatchNorm kept
    (no constant folding). `export_options` go to torch.onnx.export (opset_version, input_names...)."""
    module = unwrap(module)
    options = {"dynamo": False, "do_constant_folding": False, **export_options}
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    buffer = io.BytesIO()
    with _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
        for message in _EXPORTER_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(module, args, buffer, **options)
    model = onnx.load_from_string(buffer.getvalue())
    if path is not None:
        from onnx_morph.rewrite.surgery.save import save_model

        save_model(model, path)
    return model


def regularizer_options(**fields: Any) -> RegularizerOptions:
    """RegularizerOptions from keywords: `regularizer` for `kind`, any sequence for the name patterns."""
    if "regularizer" in fields:
        fields["kind"] = fields.pop("regularizer")
    for name in ("input_boundary", "output_boundary", "force_group", "blacklist"):
        if name in fields:
            fields[name] = tuple(fields[name])
    try:
        return RegularizerOptions(**fields)
    except TypeError as exc:
        raise OptionError(f"MorphNetRegularizer: {exc}".replace("__init__() ", "")) from None


class MorphNetRegularizer:
    """MorphNet's regularization term for a torch module, evaluated in torch on every call.

    `example_inputs` is one example input (or a tuple of them) of the shape the costs should be
    computed for; use batch 1, costs are per example as in MorphNet. The regularizer is `options`
    (a RegularizerOptions, as the ONNX route's), or its fields as keywords (`regularizer` names its
    `kind`): `cost` is flops, params,
    activations or latency:HW (HW a name from onnx_morph.costs.HARDWARE, or PEAK_GFLOPS,BANDWIDTH_GBS);
    `regularizer` is gamma (BatchNorm scales), group-lasso (weight slices) or gates (FiGS: a
    per-channel probabilistic gate on each producer of a prunable group without BatchNorm, or on
    every one with `gates_everywhere`). The other options are those of `build_regularizer`. The
    module is exported once, here; the parameters it reads are the module's own (DDP/compile
    wrappers are seen through), so the regularizer follows training, `.to(device)` and
    `load_state_dict` without being rebuilt.

    Gates are not the module's: their logits (stored / `gate_logit_scale`, as in the ONNX route) are
    `gate_parameters()`, created on the producers' device, which the optimizer must also get, and
    forward hooks on the producing modules multiply the outputs by the mask: sampled in training
    mode (logistic noise at `gate_temperature`, hard forward with `straight_through`), (logit > 0)
    in eval mode. `remove()` detaches the hooks; `prune_module` folds the eval masks instead.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        example_inputs: Any,
        *,
        options: RegularizerOptions | None = None,
        export_options: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        options = options or regularizer_options(**fields)
        regularizer, blacklist = options.kind, options.blacklist
        self.module = unwrap(module)
        if _gate_hooks(self.module):
            raise OptionError("the module carries the gate hooks of another MorphNetRegularizer, which would change "
                              "what is exported: call that regularizer's remove() first")
        self.example_inputs = example_inputs
        self.export_options = dict(export_options or {})
        model, names = _export_distinct(self.module, example_inputs, self.export_options)
        label = f"the ONNX export of {type(self.module).__name__}"
        try:
            self.graph: ChannelGraph = build_channel_graph(load_model(model))
            _refuse_constant_sources(self.graph, regularizer, blacklist, label)
            self.spec: Regularizer = options.build(self.graph)
        except OnnxMorphError as exc:
            raise type(exc)(str(exc).replace("<model>", label)) from None
        self.parameter_of: dict[str, str] = names
        parameters = dict(self.module.named_parameters())
        self.bindings: list[SourceBinding] = []
        self.gate_modules: dict[str, str] = {}
        self._hooks: list[Any] = []
        if self.spec.gates:
            self._parameters = self._add_gates(parameters, options, label)
            self._finish()
            return
        for source in self.spec.sources:
            name = names.get(source.param)
            if name is None:
                nodes = sorted({s.node for g in self.graph.groups for s in g.sources if s.param == source.param})
                raise OptionError(_not_a_parameter(source.param, nodes, label))
            if tuple(parameters[name].shape) != tuple(self.graph.model.initializer(source.param).dims):
                raise OptionError(f"regularization source '{source.param}' has another shape than parameter '{name}'")
            self.bindings.append(SourceBinding(source.param, name, source.axis, source.channels))
        self._parameters = [parameters[b.parameter] for b in self.bindings]
        self._finish()

    def _finish(self) -> None:
        everything = np.ones(self.graph.num_classes, dtype=bool)
        self.total_cost: float = self.spec.terms.cost(everything)
        self._backend: _TorchBackend | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    def source_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the term depends on (BatchNorm weights for gamma, conv/linear weights for
        group-lasso, the gate parameters for gates)."""
        return list(self._parameters)

    def gate_parameters(self) -> list[torch.nn.Parameter]:
        """The gates' trainable parameters (logit / scale), one per gate in `spec.gates` order; they are
        not the module's, so give them to the optimizer too. Empty for gamma and group-lasso."""
        return list(self._parameters) if self.spec.gates else []

    def remove(self) -> None:
        """Detach the gate hooks: the module computes its ungated function again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _add_gates(self, parameters: dict[str, torch.nn.Parameter], options: RegularizerOptions,
                   label: str) -> list[torch.nn.Parameter]:
        """A parameter and a forward hook per gate, on the module whose output is the gated tensor: the
        one that owns all of the gate's fold parameters and nothing else, so masking its output is
        masking the tensor."""
        gate_parameters = []
        for gate in self.spec.gates:
            names = [self.parameter_of.get(initializer) for initializer, _ in gate.fold]
            owners = {n.rpartition(".")[0] for n in names if n is not None}
            owner = owners.pop() if len(owners) == 1 and None not in names else None
            if owner is not None:
                own = {f"{owner}.{n}".lstrip(".") for n, _ in self.module.get_submodule(owner).named_parameters(
                    recurse=False)}
                if own != set(names) or owner in self.gate_modules.values():
                    owner = None
            if owner is None:
                raise OptionError(f"the gate on node {gate.node} (tensor '{gate.tensor}') in {label} cannot be a hook: "
                                  f"no module of the model produces exactly that tensor from its own parameters; "
                                  f"leave the node out with blacklist=[{gate.node!r}]")
            device = parameters[names[0]].device
            parameter = torch.nn.Parameter(torch.as_tensor(gate.initial_parameter(), device=device))
            hook = _gate_hook(gate, parameter, options.gate_temperature, options.straight_through)
            self._hooks.append(self.module.get_submodule(owner).register_forward_hook(hook))
            self.gate_modules[gate.param] = owner
            gate_parameters.append(parameter)
        return gate_parameters

    def _stored_gates(self) -> dict[str, np.ndarray]:
        return {g.param: _numpy(p) for g, p in zip(self.spec.gates, self._parameters)}

    def __call__(self) -> MorphNetOutput:
        """The regularization term, effective cost and alive classes for the parameters' current values."""
        backend = self._backend_on_parameters()
        term = regularization_term(backend, self.spec, self._inputs(backend))
        regularization = term.regularization
        if not regularization.requires_grad and term.vector.requires_grad:  # every slope 0 (a flat measured table)
            regularization = regularization + 0.0 * term.vector.sum()
        return MorphNetOutput(regularization, term.cost.detach(), term.alive[:-1].detach().bool())

    def alive_counts(self, alive: torch.Tensor | np.ndarray | None = None) -> dict[str, int]:
        """{producer node: alive output channels} for `alive` (by default the parameters' current
        state), as the regularizer sees it: a layer may be at 0 here, see `mask_document`."""
        from onnx_morph.rewrite.surgery.select import mask_document

        alive = _numpy(self().alive if alive is None else alive).astype(bool)
        return mask_document(self.graph, alive)["structure"]

    def mask_document(self, alive: torch.Tensor | np.ndarray | None = None) -> dict:
        """The `analyze --structure` JSON (input of `prune --mask`) for `alive`, every group keeping
        at least its strongest channel as `prune` does (MorphNet's structure), plus `modules`: the
        structure keyed by module name."""
        from onnx_morph.rewrite.surgery.select import mask_document

        document = mask_document(self.graph, self.kept(alive))
        document["model"] = type(self.module).__name__
        modules = {}
        for node, count in document["structure"].items():
            weight = self.graph.relations[node].geometry.weight
            root = self.graph.param_root(weight) if weight else None
            parameter = self.parameter_of.get(root[0]) if root else None
            if parameter is not None:
                modules[parameter.rpartition(".")[0]] = count
        document["modules"] = modules
        return document

    def kept(self, alive: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        """Per class, whether pruning keeps it: alive (by default now) and, for gates, open in eval
        mode (a channel whose gates are all closed is zero there), plus the strongest channel of any
        group that would otherwise be emptied."""
        alive = _numpy(self().alive if alive is None else alive).astype(bool)
        if self.spec.gates:
            alive = alive & self.spec.kept(self._stored_gates())[:-1]
        return _keep_one(self.graph, alive, self.vector())

    def zeroed_copy(self, kept: np.ndarray | None = None) -> torch.nn.Module:
        """A copy of the module whose dead channels' sources are exactly 0, as MorphNet counts them.

        A scale below the threshold still passes a little signal, so its channel is not the
        constant (beta, relu(beta)) that pruning can fold into the next layer; at 0 it is.
        For gates the copy has no hooks: each gate's eval mask (logit > 0), also 0 on the classes
        not kept, is folded into its producer's parameters, so the copy computes the gated module.
        """
        kept = self.kept() if kept is None else kept
        if self.spec.gates:
            return self._folded_copy(kept)
        dead = np.flatnonzero(~np.append(kept, True) & ~self.spec.fixed)
        positions = set(self.spec.gather[:, dead].ravel().tolist()) - {self.spec.zero_position}
        twin = copy.deepcopy(self.module)
        parameters = dict(twin.named_parameters())
        offset = 0
        with torch.no_grad():
            for binding in self.bindings:
                channels = [p - offset for p in positions if offset <= p < offset + binding.channels]
                if channels:
                    parameters[binding.parameter].index_fill_(binding.axis, torch.tensor(channels), 0.0)
                offset += binding.channels
        return twin

    def _folded_copy(self, kept: np.ndarray) -> torch.nn.Module:
        twin = copy.deepcopy(self.module)
        for hooks, key in _gate_hooks(twin):  # deepcopy copies the hooks too
            del hooks[key]
        parameters = dict(twin.named_parameters())
        masks = gate_masks(self.spec.gates, self._stored_gates())
        with torch.no_grad():
            for gate in self.spec.gates:
                mask = masks[gate.param] * kept[self.graph.classes(gate.tensor)]
                for initializer, axis in gate.fold:
                    parameter = parameters[self.parameter_of[initializer]]
                    shape = [1] * parameter.ndim
                    shape[axis] = gate.channels
                    parameter.mul_(torch.as_tensor(mask.reshape(shape), dtype=parameter.dtype,
                                                   device=parameter.device))
        return twin

    def vector(self) -> np.ndarray:
        """Per channel class, the regularization value (max over its sources, for gates the probability
        that one is open; 0 without one)."""
        with torch.no_grad():
            backend = self._backend_on_parameters()
            return _numpy(combined(backend, self.spec, self._inputs(backend))[:-1]).astype(np.float64)

    def _backend_on_parameters(self) -> _TorchBackend:
        """The term's backend on the parameters' device and float type, rebuilt only when they move."""
        first = self._parameters[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        if self._backend is None or self._backend.device != first.device or self._backend.dtype != dtype:
            self._backend = _TorchBackend(first.device, dtype)
        return self._backend

    def _inputs(self, backend: _TorchBackend) -> list[torch.Tensor]:
        """The source parameters in `spec.sources` order, in the backend's float type."""
        return [p if p.dtype == backend.dtype else p.to(backend.dtype) for p in self._parameters]


class _TorchBackend(OperatorBackend):
    """The regularization term's backend (rewrite.training.expression.Backend) in torch, on one device
    and float type; its constants stay there between steps."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.cache: dict[str, Any] = {}

    def constant(self, key: str, value: np.ndarray) -> torch.Tensor:
        if key not in self.cache:
            value = np.asarray(value)
            dtype = {"f": self.dtype, "b": torch.bool}.get(value.dtype.kind, torch.int64)
            self.cache[key] = torch.as_tensor(value, dtype=dtype, device=self.device)
        return self.cache[key]

    def gather(self, x: torch.Tensor, key: str, index: np.ndarray) -> torch.Tensor:
        if np.ndim(index) == 0:
            return x[int(index)]  # a view
        return x[self.constant(key, np.asarray(index, dtype=np.int64))]

    def row_sums(self, x: torch.Tensor, key: str, matrix: np.ndarray) -> torch.Tensor:
        """A segment sum (index_add, a count as that many repeats), not a dense product; where every
        column is one 1 (each cost row in one op), x itself is the source."""
        if key not in self.cache:
            self.cache[key] = self._segments(key, matrix)
        rows, cols = self.cache[key]
        picked = x if cols is None else x[..., cols]
        size = (*x.shape[:-1], matrix.shape[0])
        return torch.zeros(size, dtype=x.dtype, device=x.device).index_add_(x.dim() - 1, rows, picked)

    def _segments(self, key: str, matrix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(target row per summand, source column per summand or None) of `row_sums`."""
        if ((matrix == 0) | (matrix == 1)).all() and (matrix.sum(axis=0) == 1).all():
            return self.constant(f"{key}/rows", matrix.argmax(axis=0)), None
        rows, cols = np.nonzero(matrix)
        repeats = matrix[rows, cols].astype(np.int64)
        return (self.constant(f"{key}/rows", np.repeat(rows, repeats)),
                self.constant(f"{key}/cols", np.repeat(cols, repeats)))

    def sqrt(self, x: torch.Tensor) -> torch.Tensor:
        return x.sqrt()

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def uniform(self, like: torch.Tensor, size: int, low: float, high: float) -> torch.Tensor:
        return torch.empty(size, dtype=like.dtype, device=like.device).uniform_(low, high)

    def log(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)

    def detached(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def channel_slices(self, x: torch.Tensor, axis: int, channels: int) -> torch.Tensor:
        return x.movedim(axis, 0).reshape(channels, -1)

    def concat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs)

    def maximum(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0] if len(xs) == 1 else torch.stack(xs).amax(0)

    def as_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def select(self, condition: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(condition, x, y)


def _gate_hook(gate: Gate, parameter: torch.nn.Parameter, temperature: float, straight_through: bool):
    """The forward hook of one gate, as `add_gates` / `deterministic_gates` compute it: a closure, which
    deepcopy shares rather than copies (a bound method would copy its regularizer)."""
    shape = gate.shape

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        backend = _TorchBackend(parameter.device, parameter.dtype)
        if not module.training:  # .data: an export traces the mask as a constant, which must not require grad
            return output * open_gate_mask(backend, parameter.data).to(output.dtype).reshape(shape)
        mask = sampled_gate_mask(backend, parameter * gate.logit_scale, gate.channels, temperature, straight_through)
        return output * mask.to(output.dtype).reshape(shape)

    hook.onnx_morph_gate = gate.param
    return hook


def _gate_hooks(module: torch.nn.Module) -> list[tuple[dict, int]]:
    """(hook dict, key) of every gate hook on `module` and its submodules."""
    return [(m._forward_hooks, key) for m in module.modules() for key, hook in m._forward_hooks.items()
            if hasattr(hook, "onnx_morph_gate")]


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _keep_one(graph: ChannelGraph, alive: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Revive the strongest channel (by the trained regularization vector) of every emptied group."""
    alive = alive.copy()
    for group in graph.groups:
        if group.size and not alive[group.classes].any():
            alive[group.classes[int(np.argmax(vector[group.classes]))]] = True
    return alive


def _not_a_parameter(tensor: str, nodes: list[str], label: str) -> str:
    return (f"regularization source '{tensor}' (of node {', '.join(nodes)} in {label}) is not a parameter of the "
            f"module but a constant or buffer, so training cannot change it: make it a parameter (BatchNorm with "
            f"affine=True), or leave the node out with blacklist=[{nodes[0]!r}]")


def _refuse_constant_sources(graph: ChannelGraph, kind: str, blacklist: Sequence[str], label: str) -> None:
    """A source held in a Constant node (BatchNorm(affine=False) exports its scale so) is no
    parameter; say so before build_regularizer, which expects initializers."""
    wanted = {"gamma": "gamma", "group-lasso": "weight"}.get(kind)
    for group in graph.groups:
        for source in group.sources:
            if (source.kind == wanted and graph.model.initializer(source.param) is None
                    and not any(re.fullmatch(pattern, source.node) for pattern in blacklist)):
                raise OptionError(_not_a_parameter(source.param, [source.node], label))


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _export_distinct(module: torch.nn.Module, example_inputs: Any,
                     export_options: dict[str, Any]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Export a copy whose parameters all hold distinct random values, and map initializers to
    parameter names by value.

    The exporter merges equal-valued initializers (every BatchNorm scale of a fresh model is 1,
    so they would all become one tensor) and may rename them; distinct values prevent the merge
    and make the value a fingerprint of the parameter.
    """
    twin = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    fingerprints: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            values = torch.empty(parameter.shape, dtype=torch.float64).uniform_(0.5, 1.5, generator=generator)
            parameter.copy_(values.to(parameter.dtype))
            fingerprints.setdefault(tuple(parameter.shape), []).append((name, parameter.detach().cpu().numpy()))
    model = export_onnx(twin, example_inputs, **export_options)
    names: dict[str, str] = {}
    for tensor in model.graph.initializer:
        candidates = fingerprints.get(tuple(tensor.dims), [])
        if not candidates:
            continue
        value = numpy_helper.to_array(tensor)
        hits = [name for name, fingerprint in candidates if value.dtype == fingerprint.dtype
                and np.array_equal(value, fingerprint)]
        if len(hits) == 1:
            names[tensor.name] = hits[0]
    return model, names


def export_structure(regularizer: MorphNetRegularizer, path: str | os.PathLike | None = None) -> dict[str, int]:
    """MorphNet's learned structure, {producer node: alive output channels}, for the module's
    current parameters. With `path`, writes the full document (structure, per-module widths and
    channel masks): `onnx-morph prune model.onnx --mask path` applies it to an export of the module."""
    import json

    document = regularizer.mask_document()
    if path is not None:
        from onnx_morph.rewrite.surgery.save import write_text

        text = json.dumps(document, indent=1)
        text = re.sub(r"\[[\s01,]*\]", lambda m: "".join(m.group(0).split()).replace(",", ", "), text)
        write_text(text + "\n", path)
    return document["structure"]


def prune_module(regularizer: MorphNetRegularizer, path: str | os.PathLike | None = None, *,
                 calibration: Iterable[torch.Tensor | np.ndarray] | None = None, round_to: int = ROUND_TO,
                 **prune_options: Any):
    """Export the trained module and remove the channels the regularizer finds dead.

    The dead set is the regularizer's own (its kind, threshold and source grouping), applied as a
    mask document, so the pruned widths are exactly the training-time alive counts. What is
    exported is `zeroed_copy()`: dead sources at exactly 0 (the module itself is not changed), so
    every removed channel holds a constant (beta, relu(beta)) that `prune` folds into its consumers
    where that is exact (Gemm, unpadded Conv) and drops elsewhere. A dropped constant shifts the
    next BatchNorm's input, so give `calibration` (input batches, e.g. 20 training batches): the
    pruned model's BatchNorm statistics are then measured on them, which absorbs the shift.
    Unless `export_options` say otherwise, the batch dimension of the inputs and outputs is dynamic.
    Returns onnx_morph.rewrite.PruneResult (`model` is the calibrated one; the deviations are those
    of the uncalibrated surgery); with `path`, the model is also saved there. Widths are rounded up to
    multiples of `round_to`; `prune_options` go to `prune` (fold_constants, verify).
    """
    from onnx_morph.rewrite import Mask, prune, save_model
    from onnx_morph.rewrite.training.training_graph import unshare_initializers

    kept = regularizer.kept()
    document = regularizer.mask_document(kept)
    module = regularizer.zeroed_copy(kept)
    model = unshare_initializers(export_onnx(module, regularizer.example_inputs, **_batch_dynamic(regularizer)))
    batches = None if calibration is None else [_numpy(b).astype(np.float32) for b in calibration]
    result = prune(model, Mask(document, round_to=round_to), calibration=batches, **prune_options)
    if path is not None:
        save_model(result.model, Path(path))
    return result


def _batch_dynamic(regularizer: MorphNetRegularizer) -> dict[str, Any]:
    """The regularizer's export options, with a dynamic first dimension on every input and output
    (named as the exporter names them) unless the options already set dynamic axes."""
    options = dict(regularizer.export_options)
    if "dynamic_axes" in options or options.get("dynamo"):
        return options
    graph = regularizer.graph.model.model.graph
    constants = {t.name for t in graph.initializer}
    inputs = [v.name for v in graph.input if v.name not in constants and v.type.tensor_type.shape.dim]
    outputs = [v.name for v in graph.output if v.type.tensor_type.shape.dim]
    options.setdefault("input_names", [v.name for v in graph.input if v.name not in constants])
    options.setdefault("output_names", [v.name for v in graph.output])
    options["dynamic_axes"] = {name: {0: "batch"} for name in inputs + outputs}
    return options
