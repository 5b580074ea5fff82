"""MorphNet in a PyTorch training loop, driven by the same ONNX analysis as the rest of onnx-morph.

`MorphNetRegularizer` exports the module once, builds the channel graph and the shared
`Regularizer` (onnx_morph.rewrite.training.regularizer), maps every regularization source back to the
module's own parameters, and from then on evaluates MorphNet's term in torch on each call: the
same formula the ONNX rewrite emits (per-source vectors, max over a class's sources, alive as a
non-differentiable step, cost polynomials, latency's per-op roofline), with no re-export.
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

from onnx_morph.costs.terms import COEFFICIENTS
from onnx_morph.errors import OnnxMorphError, OptionError
from onnx_morph.graph import ChannelGraph, build_channel_graph, load_model
from onnx_morph.rewrite.training.gates import gate_masks
from onnx_morph.rewrite.training.regularizer import RMS_EPSILON, Gate, Regularizer, RegularizerOptions
from onnx_morph.rewrite.training.training_graph import NOISE_EPSILON

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
        self.total_cost: float = self.spec.terms.evaluate(everything, np.zeros(self.graph.num_classes))[0]
        self._device: torch.device | None = None
        self._constants: dict[str, Any] = {}

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
        c = self._on(self._parameters[0].device)
        r = self._combined(c)
        with torch.no_grad():
            above = r >= self.spec.threshold if self.spec.gates else r > self.spec.threshold
            alive = (above | c["fixed"]).to(r.dtype)
        a_in, a_out = (self._row_sums(alive, c[side]) for side in ("in", "out"))
        r_in, r_out = (self._row_sums(r, c[side]) for side in ("in", "out"))
        k = c["coefficients"]
        cost = _polynomial([(k["bilinear"], a_in * a_out), (k["in_linear"], a_in), (k["out_linear"], a_out),
                            (k["constant"], None)], c["zeros"])
        reg = _polynomial([(k["bilinear"], a_in * r_out + a_out * r_in), (k["in_linear"], r_in),
                           (k["out_linear"], r_out), (k["depthwise"], r_in)], c["zeros"])
        if self.spec.terms.parts == 1:
            total_cost, total_reg = cost.sum(), reg.sum()
        else:
            total_cost, total_reg = _roofline(cost, reg, c["row_node"], c["nodes"])
        if not total_reg.requires_grad and r.requires_grad:  # every slope 0 (a flat measured table): still a term
            total_reg = total_reg + 0.0 * r.sum()
        return MorphNetOutput(total_reg, total_cost.detach(), alive[:-1].detach().bool())

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
            return _numpy(self._combined(self._on(self._parameters[0].device))[:-1]).astype(np.float64)

    def _combined(self, c: dict[str, Any]) -> torch.Tensor:
        """Per class (plus the fixed class), its sources combined: 1 - prod(1 - p) for gates, else max."""
        values = torch.cat(self._source_vectors(c["dtype"]) + [c["zero"]])
        if self.spec.gates:
            return 1 - (1 - values[c["gather"]]).prod(0)
        if c["gather"].shape[0] == 1:
            return values[c["gather"][0]]
        return values[c["gather"]].amax(0)  # ties share the gradient, as in onnxruntime's Max and MorphNet's reduce_max

    def _source_vectors(self, dtype: torch.dtype) -> list[torch.Tensor]:
        if self.spec.gates:
            return [torch.sigmoid(p.to(dtype) * g.logit_scale) for g, p in zip(self.spec.gates, self._parameters)]
        if self.spec.kind == "gamma":
            return [torch.cat([p.reshape(-1) for p in self._parameters]).to(dtype).abs()]
        f = self.spec.l1_fraction
        vectors = []
        for p, b in zip(self._parameters, self.bindings):
            slices = p.to(dtype).movedim(b.axis, 0).reshape(b.channels, -1)
            rms = (slices * slices).mean(1).add(RMS_EPSILON).sqrt()
            vectors.append(rms if f == 0 else f * slices.abs().mean(1) + (1 - f) * rms)
        return vectors

    @staticmethod
    def _row_sums(x: torch.Tensor, side: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """Per row, the sum of x over the row's classes (the count matrix times x, as a segment sum)."""
        classes, rows, count = side
        return torch.zeros(count, dtype=x.dtype, device=x.device).index_add_(0, rows, x[classes])

    def _on(self, device: torch.device) -> dict[str, Any]:
        """The constant tensors on `device`, rebuilt only when the parameters move."""
        dtype = torch.float64 if self._parameters[0].dtype == torch.float64 else torch.float32
        if self._constants and self._device == device and self._constants["dtype"] == dtype:
            return self._constants
        terms, spec = self.spec.terms, self.spec
        as_long = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)  # noqa: E731
        c: dict[str, Any] = {"dtype": dtype, "zero": torch.zeros(1, dtype=dtype, device=device),
                             "gather": as_long(spec.gather),
                             "fixed": torch.as_tensor(spec.fixed, device=device)}
        for side in ("in", "out"):
            per_row = [row.in_classes if side == "in" else row.out_classes for row in terms.rows]
            classes = np.concatenate(per_row + [np.zeros(0, np.int64)])
            rows = np.repeat(np.arange(len(per_row)), [len(p) for p in per_row])
            c[side] = (as_long(classes), as_long(rows), len(per_row))
        c["zeros"] = torch.zeros(terms.parts, len(terms.rows), dtype=dtype, device=device)
        c["coefficients"] = {name: _nonzero(terms.coefficients(name), dtype, device) for name in COEFFICIENTS}
        node_index = {n: i for i, n in enumerate(terms.nodes)}
        c["row_node"] = as_long([node_index[row.node] for row in terms.rows])
        c["nodes"] = len(node_index)
        self._constants, self._device = c, device
        return c


def _gate_hook(gate: Gate, parameter: torch.nn.Parameter, temperature: float, straight_through: bool):
    """The forward hook of one gate, as `add_gates` / `deterministic_gates` compute it: a closure, which
    deepcopy shares rather than copies (a bound method would copy its regularizer)."""
    shape = gate.shape

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:  # .data: an export traces the mask as a constant, which must not require grad
            return output * (parameter.data > 0).to(output.dtype).reshape(shape)
        logits = parameter * gate.logit_scale
        u = torch.empty_like(logits).uniform_(NOISE_EPSILON, 1 - NOISE_EPSILON)
        mask = torch.sigmoid((logits + torch.log(u / (1 - u))) / temperature)
        if straight_through:
            mask = (mask > 0.5).to(mask.dtype) + mask - mask.detach()
        return output * mask.to(output.dtype).reshape(shape)

    hook.onnx_morph_gate = gate.param
    return hook


def _gate_hooks(module: torch.nn.Module) -> list[tuple[dict, int]]:
    """(hook dict, key) of every gate hook on `module` and its submodules."""
    return [(m._forward_hooks, key) for m in module.modules() for key, hook in m._forward_hooks.items()
            if hasattr(hook, "onnx_morph_gate")]


def _polynomial(terms: list[tuple[torch.Tensor | None, torch.Tensor | None]], zeros: torch.Tensor) -> torch.Tensor:
    """sum of coefficient * monomial over the terms whose coefficients are not all zero; (parts, rows)."""
    total = None
    for coefficient, monomial in terms:
        if coefficient is None:
            continue
        term = coefficient if monomial is None else coefficient * monomial
        total = term if total is None else total + term
    return zeros if total is None else total


def _roofline(cost: torch.Tensor, reg: torch.Tensor, row_node: torch.Tensor, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per op, the larger of compute and memory time, regularized through that one."""
    def per_node(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], nodes, dtype=x.dtype, device=x.device).index_add_(1, row_node, x)

    cost_n, reg_n = per_node(cost), per_node(reg)
    compute_bound = cost_n[0] >= cost_n[1]
    return (torch.where(compute_bound, cost_n[0], cost_n[1]).sum(),
            torch.where(compute_bound, reg_n[0], reg_n[1]).sum())


def _nonzero(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return torch.as_tensor(values, dtype=dtype, device=device) if values.any() else None


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
                 calibration: Iterable[torch.Tensor | np.ndarray] | None = None, **prune_options: Any):
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
    of the uncalibrated surgery); with `path`, the model is also saved there. `prune_options` go
    to `prune` (round_to, fold_constants, verify).
    """
    from onnx_morph.rewrite import prune, save_model
    from onnx_morph.rewrite.training.training_graph import unshare_initializers

    kept = regularizer.kept()
    document = regularizer.mask_document(kept)
    module = regularizer.zeroed_copy(kept)
    model = unshare_initializers(export_onnx(module, regularizer.example_inputs, **_batch_dynamic(regularizer)))
    batches = None if calibration is None else [_numpy(b).astype(np.float32) for b in calibration]
    result = prune(model, masks=document, calibration=batches, **prune_options)
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
