"""The channel dependency graph of any CNN, from a ``torch.fx`` trace: which channels go together.

Every channel of every traced tensor is an *atom*; operations tie atoms together (a union-find), and a
*channel* (one prunable unit) is a class of tied atoms. The rules, one per kind of operation:

- conv / linear (groups 1): new atoms for its outputs; its weight's input dim is indexed by the input's atoms
  (a linear layer only on [B, features]: on channels-last tensors, as in transformers, it is not mapped);
- depthwise conv (groups = in = out channels): its output channel i *is* its input channel i (tied), and the
  layer's groups shrink with it; another grouped conv (groups G): each of its groups, inputs and outputs, is
  one channel (tied), so a whole group goes and G shrinks (every group keeps its size: the layer stays one conv);
- BatchNorm, activations, pooling, dropout, stochastic depth, identity: the same atoms pass through;
- ``+ - * /`` of two tensors with the same channel count: channel i of every operand tied (residual sums,
  squeeze-excitation's ``x * scale``); an operand with one channel (or none) broadcasts and ties nothing;
- ``cat`` along channels: the operands' atoms one after another (DenseNet);
- ``flatten`` / ``view(B, -1)`` of [B, C, H, W]: each atom repeated H x W times (a linear layer's input dim
  then holds H x W columns per channel);
- means or pools over the spatial dims keep the atoms; anything else (channel shuffle, reshapes or permutes
  across channels, splits, unknown modules with parameters, custom functions): every atom it touches is
  unprunable, with a warning naming the operation.

Masking (the stages zero a channel's producer rows, biases and BatchNorm entries) equals removing it only where no
conv or linear layer reads the channel nonzero: ``live`` follows which channels of each tensor may be nonzero
though masked (after a sigmoid or a ``+ c``; a product is zero when a factor is), and ``unsafe`` holds those a layer
reads. The network's input and output channels are unprunable. A *group* is the set of channels that live in the
same layers (a conv's outputs; a residual stream's channels, shared by every block writing into it). Removing a
channel removes its atoms everywhere: the producers' output rows, the BN entries, the consumers' input
columns. :meth:`ChannelGraph.masked` is the separate check: the unmodified network with every traced tensor
multiplied by 0 at the removed channels' atoms.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from prune_cli.core.errors import UserError

ACTIVATION_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
)
PASS_MODULES = ACTIVATION_MODULES + (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
ACTIVATION_FUNCTIONS = {  # the functional nonlinearities, by the module's name
    torch.relu: "ReLU",
    torch.nn.functional.relu: "ReLU",
    torch.nn.functional.relu6: "ReLU6",
    torch.nn.functional.silu: "SiLU",
    torch.nn.functional.gelu: "GELU",
    torch.nn.functional.hardswish: "Hardswish",
    torch.nn.functional.hardsigmoid: "Hardsigmoid",
    torch.sigmoid: "Sigmoid",
    torch.tanh: "Tanh",
}
PASS_FUNCTIONS = set(ACTIVATION_FUNCTIONS) | {
    torch.nn.functional.dropout,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool2d,
}
SHIFTING_MODULES = (nn.Sigmoid, nn.Hardsigmoid)  # they map 0 to 0.5: a zeroed channel stops being zero
SHIFTING_FUNCTIONS = {torch.sigmoid, torch.nn.functional.hardsigmoid}
MULTIPLYING = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}  # 0 times a finite factor is 0
DIVIDING = {operator.truediv, torch.div, "div"}  # 0 / c is 0 (a masked channel must not divide: 0 / 0)
IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
PASS_METHODS = {"relu", "relu_", "sigmoid", "contiguous", "clone", "detach", "float"}
ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv}
ELEMENTWISE |= {torch.add, torch.sub, torch.mul, torch.div}
ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "div"}


def _stochastic_depth() -> tuple[type, ...]:
    """torchvision's stochastic depth (drops whole samples: channel-preserving), as a module."""
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # torchvision is a dependency, but the graph itself does not need it
        return ()
    return (StochasticDepth,)


class _Tracer(fx.Tracer):
    """fx's tracer, remembering the module it was in when tracing failed (named in the error)."""

    def __init__(self):
        super().__init__()
        self.path: list[str] = []
        self.failed_in: str | None = None  # the innermost module being traced when tracing failed

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path[-1]
            raise
        finally:
            self.path.pop()


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The model's fx graph with every node's output shape (one forward of ``example``), or one line naming the
    module that cannot be traced."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = tracer.failed_in or type(model).__name__
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError("model", f"{where or 'the top-level module'} cannot be traced by torch.fx ({why})") from None
    gm = fx.GraphModule(model, graph)
    modes = [(m, m.training) for m in model.modules()]
    param = next(model.parameters(), None)
    if param is not None:  # the network's device and precision
        floating = param.is_floating_point() and example.is_floating_point()  # indices stay integers
        example = example.to(param.device, param.dtype if floating else example.dtype)
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError("model", f"the network fails on an input of shape {tuple(example.shape)} ({why})") from None
    finally:
        for m, training in modes:  # gm shares the modules: every one's own mode back
            m.training = training
    return gm


@dataclass
class Group:
    """Channels that live in the same layers: removing one removes its rows / columns in each of ``layers``."""

    name: str  # its first producer (the layer whose output rows it is)
    channels: list[int]  # channel (class) ids, in the producer's output order
    layers: list[str] = field(default_factory=list)


class ChannelGraph:
    """Coupled channels of ``model`` (traced on ``example``, one batch of inputs)."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        self.gm = trace(model, example)
        self.modules = dict(model.named_modules())
        self.parent: list[int] = []
        self.blocked: set[int] = set()
        self.why: dict[int, str] = {}  # a blocked atom -> the operation that blocked it
        self.atoms: dict[str, np.ndarray] = {}  # node name -> atom per channel (None: no channel dim)
        self.dims: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # (module, param) -> {dim: atoms}
        self.pixels: dict[str, int] = {}  # conv / linear module -> output pixels per image
        self.pads: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # padding module -> atoms it pads before / after
        # per traced tensor: which channels may be nonzero when their channel's producer rows and BatchNorm entries
        # are zeroed (the stages' mask): after a sigmoid or a "+ 1", say; a multiplication by a zero channel or a
        # layer whose rows are zeroed makes them zero again
        self.live: dict[str, np.ndarray] = {}
        self.unsafe: set[int] = set()  # atoms a conv / linear layer reads while live: the mask would not remove them
        self.activations: set[str] = set()  # the nonlinearities the network applies (ReLU, SiLU, ...)
        self.warnings: list[str] = []
        self._propagate()
        self._classes()

    # ------------------------------------------------------------------ atoms and their union-find

    def _new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def _find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def _tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self.parent[ry] = rx

    def _read(self, arg) -> None:
        """A conv / linear layer reads ``arg``: its live channels (nonzero though masked) make masking no removal."""
        atoms = self._of(arg)
        if atoms is not None:
            self.unsafe.update(atoms[self.live[arg.name]].tolist())

    def _block(self, atoms, why: str) -> None:
        for a in np.asarray(atoms).ravel().tolist():
            self.blocked.add(a)
            self.why.setdefault(a, why)

    # ------------------------------------------------------------------ propagation over the trace

    @staticmethod
    def _shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _of(self, arg) -> np.ndarray | None:
        return self.atoms.get(arg.name) if isinstance(arg, fx.Node) else None

    def _opaque(self, node, what: str) -> None:
        """An operation the graph cannot map: every channel it touches is unprunable."""
        touched = [self._of(a) for a in node.all_input_nodes]
        if any(t is not None for t in touched):
            msg = f"{what} ({node.name}) cannot be mapped: the channels it touches are unprunable"
            self.warnings.append(msg)
            warnings.warn(msg, stacklevel=3)
        for t in touched:
            if t is not None:
                self._block(t, what)
        shape = self._shape(node)
        if shape is not None and len(shape) >= 2:
            out = self._new(shape[1])
            self._block(out, what)
            self.atoms[node.name] = out

    def _propagate(self) -> None:
        for node in self.gm.graph.nodes:
            shape = self._shape(node)
            if node.op == "placeholder":
                if shape is not None and len(shape) >= 2:
                    self.atoms[node.name] = self._new(shape[1])
                    self._block(self.atoms[node.name], "the network's input")
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    if self._of(arg) is not None:
                        self._block(self._of(arg), "the network's output")
            elif node.op == "call_module":
                self._module(node, self.modules[node.target])
            elif node.op == "call_function":
                self._function(node, node.target, shape)
            elif node.op == "call_method":
                self._method(node, shape)
            # get_attr (a parameter or buffer read directly) has no atoms of its own
            if self.atoms.get(node.name) is not None and node.name not in self.live:  # passed through: as its input
                first = next((a for a in node.all_input_nodes if self.live.get(a.name) is not None), None)
                same = first is not None and len(self.live[first.name]) == len(self.atoms[node.name])
                self.live[node.name] = self.live[first.name] if same else np.ones(len(self.atoms[node.name]), bool)
            overwritten = self._overwritten(node)
            if overwritten is not None and node.name in self.live:  # later reads of the input read this result
                before = self.live.get(overwritten.name)
                if before is not None and len(before) == len(self.live[node.name]):
                    self.live[overwritten.name] = before | self.live[node.name]

    def _overwritten(self, node) -> fx.Node | None:
        """The input an in-place operation overwrites (``x.add_(1)``, ``x += y``, ``Hardsigmoid(inplace=True)``)."""
        if node.op == "call_method":
            inplace = str(node.target).endswith("_")
        elif node.op == "call_function":
            inplace = node.target in IN_PLACE or bool(node.kwargs.get("inplace"))
        elif node.op == "call_module":
            inplace = bool(getattr(self.modules[node.target], "inplace", False))
        else:
            inplace = False
        first = node.args[0] if inplace and node.args else None
        return first if isinstance(first, fx.Node) else None

    def _module(self, node, m: nn.Module) -> None:
        x = self._of(node.args[0]) if node.args else None
        if isinstance(m, nn.Conv2d):
            self._conv(node, m, x)
        elif isinstance(m, nn.Linear):
            self._linear(node, m, x)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            self._batchnorm(node, m, x)
        elif isinstance(m, PASS_MODULES + _stochastic_depth()):
            self.atoms[node.name] = x
            if isinstance(m, ACTIVATION_MODULES):
                self.activations.add(type(m).__name__)
            if isinstance(m, SHIFTING_MODULES) and x is not None:
                self.live[node.name] = np.ones(len(x), bool)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, x, m.start_dim, m.end_dim)
        else:
            self._opaque(node, f"module {node.target} ({type(m).__name__})")

    def _conv(self, node, m: nn.Conv2d, x) -> None:
        """A conv's output channels: new atoms (groups 1), its input's (depthwise), or tied to their group's inputs."""
        self.pixels[node.target] = int(np.prod(self._shape(node)[2:]))
        if m.groups == 1:
            out = self._new(m.out_channels)
            self._read(node.args[0])
            self._param(node.target, "weight", {0: out, 1: x})
        elif m.groups == m.in_channels == m.out_channels:
            out = x  # depthwise: output channel i is input channel i
            self._param(node.target, "weight", {0: out})
        else:  # grouped: group g's inputs and outputs go together, so only whole groups go
            out = self._new(m.out_channels)
            a, b = m.in_channels // m.groups, m.out_channels // m.groups
            for g in range(m.groups):
                unit = np.concatenate([x[g * a : (g + 1) * a], out[g * b : (g + 1) * b]])
                self._tie(np.full(len(unit) - 1, unit[0]), unit[1:])
            self._param(node.target, "weight", {0: out})  # its input dim indexes within a group: it stays
        if m.bias is not None:
            self._param(node.target, "bias", {0: out})
        self.atoms[node.name] = out
        self.live[node.name] = np.zeros(len(out), bool)  # a masked channel's rows and bias are zero

    def _linear(self, node, m: nn.Linear, x) -> None:
        """A linear layer on [B, features]: new atoms for its outputs; on other inputs it is opaque."""
        shape = self._shape(node)
        self.pixels[node.target] = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        src = self._shape(node.args[0])
        # the atoms name dim 1; only on a [B, features] input is that the dim a linear layer reads
        if x is None or src is None or len(src) != 2 or len(x) != m.in_features:
            self._opaque(node, f"linear layer {node.target} on a tensor of {len(src or ())} dims (channels last)")
            return
        out = self._new(m.out_features)
        self._read(node.args[0])
        self._param(node.target, "weight", {0: out, 1: x})
        if m.bias is not None:
            self._param(node.target, "bias", {0: out})
        self.atoms[node.name] = out
        self.live[node.name] = np.zeros(len(out), bool)

    def _batchnorm(self, node, m: nn.Module, x) -> None:
        """A BatchNorm: its parameters and running statistics indexed by its input's atoms, which pass through."""
        for p in ("weight", "bias"):
            if getattr(m, p, None) is not None:
                self._param(node.target, p, {0: x})
        for b in ("running_mean", "running_var"):
            if getattr(m, b, None) is not None:
                self._param(node.target, b, {0: x})
        self.atoms[node.name] = x
        if x is not None:
            self.live[node.name] = np.zeros(len(x), bool)  # gamma and beta zeroed: 0 whatever comes in

    def _function(self, node, fn, shape) -> None:
        if fn in PASS_FUNCTIONS or getattr(fn, "__module__", "").startswith("torchvision.ops.stochastic_depth"):
            self.atoms[node.name] = self._of(node.args[0])
            if fn in ACTIVATION_FUNCTIONS:
                self.activations.add(ACTIVATION_FUNCTIONS[fn])
            if fn in SHIFTING_FUNCTIONS and self._of(node.args[0]) is not None:
                self.live[node.name] = np.ones(len(self._of(node.args[0])), bool)
        elif fn in ELEMENTWISE:
            self._elementwise(node, shape)
        elif fn is torch.cat:
            self._cat(node)
        elif fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, self._of(node.args[0]), start, end)
        elif fn is torch.mean:
            self._reduce(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        elif fn is operator.getitem and shape is not None and self._of(node.args[0]) is not None:
            self._index(node)
        elif fn is torch.nn.functional.pad and len(shape or ()) == 4:
            self._pad(node)
        elif fn in (getattr, operator.getitem) and shape is None:
            pass  # x.shape, sizes: no channels
        else:
            self._opaque(node, f"function {getattr(fn, '__name__', fn)}")

    def _method(self, node, shape) -> None:
        name = node.target
        if name in PASS_METHODS:
            self.atoms[node.name] = self._of(node.args[0])
            if name in ("relu", "relu_", "sigmoid"):
                self.activations.add("ReLU" if name.startswith("relu") else "Sigmoid")
            if name == "sigmoid" and self._of(node.args[0]) is not None:
                self.live[node.name] = np.ones(len(self._of(node.args[0])), bool)
        elif name in ELEMENTWISE_METHODS:
            self._elementwise(node, shape)
        elif name == "mean":
            self._reduce(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        elif name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            self._flatten(node, self._of(node.args[0]), start, -1)
        elif name in ("view", "reshape") and shape is not None and len(shape) == 2:
            src = self._shape(node.args[0])
            if src and src[0] == shape[0]:  # x.view(B, -1): a flatten
                self._flatten(node, self._of(node.args[0]), 1, -1)
            else:
                self._opaque(node, f"method {name}")
        elif name in ("size", "dim") or shape is None:
            pass
        else:
            self._opaque(node, f"method {name}")

    def _elementwise(self, node, shape) -> None:
        if shape is None or len(shape) < 2:
            self._opaque(node, f"{node.target} on tensors without channels")
            return
        operands = [(self._of(a), self._shape(a)) for a in node.args if isinstance(a, fx.Node)]
        per_channel = [(atoms, s) for atoms, s in operands if s is not None and len(s) >= 2 and s[1] == shape[1] > 1]
        full = [atoms for atoms, _ in per_channel if atoms is not None]
        if not full or len(full) < len(per_channel):
            # a per-channel operand the graph cannot follow (a parameter multiplied in, a layer scale): surgery could
            # not slice it, so the channels stay
            self._opaque(node, f"{getattr(node.target, '__name__', node.target)} with an untracked per-channel operand")
            return
        divisor = node.args[1] if node.target in DIVIDING and len(node.args) > 1 else None
        if self._of(divisor) is not None and len(self._of(divisor)) == shape[1]:
            self._opaque(node, "division by a per-channel tensor (a masked channel would divide by 0)")
            return
        for other in full[1:]:
            self._tie(full[0], other)
        self.atoms[node.name] = full[0]
        tracked = [self.live[a.name] for a in node.args if isinstance(a, fx.Node) and self._of(a) is not None]
        tracked = [t for t in tracked if len(t) == len(full[0])]
        name = node.target
        if name in MULTIPLYING:  # zero when any per-channel factor is
            self.live[node.name] = np.logical_and.reduce(tracked)
        elif name in DIVIDING:  # by a constant or a broadcast tensor: zero when the numerator is
            numerator = self.live.get(getattr(node.args[0], "name", None))
            same = numerator is not None and len(numerator) == len(full[0])
            self.live[node.name] = numerator if same else np.ones(len(full[0]), bool)
        else:  # a sum is zero when every term is: not with a constant or a broadcast tensor added
            constant = any(isinstance(a, int | float) and a != 0 for a in node.args)
            broadcast = constant or len(operands) > len(per_channel)
            self.live[node.name] = np.ones(len(full[0]), bool) if broadcast else np.logical_or.reduce(tracked)

    def _cat(self, node) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [self._of(t) for t in tensors]
        ndim = len(self._shape(node))
        if dim % ndim == 1 and all(p is not None for p in parts):
            self.atoms[node.name] = np.concatenate(parts)
            self.live[node.name] = np.concatenate([self.live[t.name] for t in tensors])
        else:
            self._opaque(node, "cat along a dim other than the channels")

    def _index(self, node) -> None:
        """``x[:, :, ...]``: indexing that keeps every channel (spatial subsampling) keeps the atoms."""
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        whole = slice(None)
        if len(index) >= 2 and index[0] == whole and index[1] == whole:
            self.atoms[node.name] = self._of(node.args[0])
        else:
            self._opaque(node, "indexing along the channels")

    def _pad(self, node) -> None:
        """``F.pad`` of [B, C, H, W]: padding along the channels (the option-A shortcut) adds channels of zeros,
        new atoms that join the residual stream they are added to; the input's channels keep theirs (a later
        stage's channel that carries an earlier one goes only with it). A padded channel can go when the module
        doing the padding names its widths (``channel_padding = (attribute before, attribute after)``),
        which surgery then lowers; otherwise the widths are fixed and those channels are unprunable."""
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        x = self._of(node.args[0])
        left, right = (pad[4], pad[5]) if len(pad) >= 6 else (0, 0)
        if len(pad) > 6 or x is None:
            self._opaque(node, "padding beyond the channels")
            return
        before, after = self._new(left), self._new(right)
        stack = list(node.meta.get("nn_module_stack", {}))
        owner = stack[-1] if stack else None
        if owner is not None and getattr(self.modules[owner], "channel_padding", None):
            self.pads[owner] = (before, after)
        else:
            self._block(np.concatenate([before, after]), "zero-padded channels (fixed padding widths)")
        self.atoms[node.name] = np.concatenate([before, x, after])
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
        filled = np.full(left + right, bool(value))  # padded with zeros: nothing to mask; with a constant: live
        self.live[node.name] = np.concatenate([filled[:left], self.live[node.args[0].name], filled[left:]])

    def _flatten(self, node, x, start: int, end: int) -> None:
        src = self._shape(node.args[0])
        if x is None or src is None or start % len(src) != 1 or end % len(src) != len(src) - 1:
            self._opaque(node, "flatten of other dims than channels and space")
            return
        self.atoms[node.name] = np.repeat(x, int(np.prod(src[2:])))  # channel-major: c * H * W + position
        self.live[node.name] = np.repeat(self.live[node.args[0].name], int(np.prod(src[2:])))

    def _reduce(self, node, dims) -> None:
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        ndim = len(self._shape(node.args[0]))
        if dims and all(d % ndim >= 2 for d in dims):
            self.atoms[node.name] = self._of(node.args[0])
        else:
            self._opaque(node, "a mean over the channels")

    def _param(self, module: str, param: str, dims: dict[int, np.ndarray | None]) -> None:
        key = (module, param)
        known = self.dims.setdefault(key, {})
        for d, atoms in dims.items():
            if atoms is None:
                continue
            if d in known:  # a layer called twice: its channels are the same channels both times
                self._tie(known[d], atoms)
            else:
                known[d] = atoms

    # ------------------------------------------------------------------ channels and groups

    def _classes(self) -> None:
        """Channels (classes of tied atoms that index some parameter), the unprunable ones and why, and the groups:
        the prunable channels that index the same layers, in order of first appearance."""
        roots = np.array([self._find(a) for a in range(len(self.parent))])
        blocked_roots = {roots[a] for a in self.blocked}
        self.reasons: dict[int, str] = {}
        for a in self.blocked:
            self.reasons.setdefault(int(roots[a]), self.why[a])
        self.root = roots
        # a channel lives wherever one of its atoms indexes a parameter
        where: dict[int, set[tuple[str, str, int]]] = {}
        order: dict[int, tuple[int, int]] = {}
        producer: dict[int, str] = {}  # the first layer whose weight rows a channel is
        for rank, ((module, param), dims) in enumerate(self.dims.items()):
            for d, atoms in dims.items():
                for pos, r in enumerate(roots[atoms].tolist()):
                    where.setdefault(r, set()).add((module, param, d))
                    order.setdefault(r, (rank, pos))
                    if d == 0 and param == "weight":
                        producer.setdefault(r, module)
        self.unprunable = {r for r in where if r in blocked_roots}
        by_layers: dict[frozenset, list[int]] = {}
        for r in sorted(where, key=lambda r: order[r]):
            if r not in blocked_roots:
                by_layers.setdefault(frozenset(m for m, _, _ in where[r]), []).append(r)
        self.groups = [
            Group(name=producer.get(rs[0], min(layers)), channels=rs, layers=sorted(layers))
            for layers, rs in by_layers.items()
        ]
        self.channels_in = where

    def share_unprunable(self) -> tuple[float, dict[str, int]]:
        """The share of channels (classes that index a parameter) that cannot be pruned, and why (counts)."""
        reasons: dict[str, int] = {}
        for r in self.unprunable:
            key = self.reasons.get(r, "?")
            reasons[key] = reasons.get(key, 0) + 1
        return len(self.unprunable) / max(len(self.channels_in), 1), reasons

    # ------------------------------------------------------------------ removing channels

    def _kept(self, atoms: np.ndarray, removed) -> torch.Tensor:
        """Per atom: does its channel stay? (``removed``: channel ids, a set or an int array)"""
        gone = removed if isinstance(removed, np.ndarray) else np.fromiter(removed, np.int64, len(removed))
        return torch.from_numpy(~np.isin(self.root[atoms], gone))

    def count(self, removed: set[int]) -> tuple[int, int]:
        """(params, MACs per image) after removing the ``removed`` channels: parameter elements from the kept sizes of
        every indexed dim, MACs = conv / linear weight elements x output pixels. Computed, not measured."""
        params = macs = 0
        removed = np.fromiter(removed, np.int64, len(removed))
        for name, p in self.model.named_parameters():
            module, _, pname = name.rpartition(".")
            dims = self.dims.get((module, pname), {})
            n = 1
            for d, size in enumerate(p.shape):
                n *= int(self._kept(dims[d], removed).sum()) if d in dims else size
            params += n
            if pname == "weight" and module in self.pixels:
                macs += n * self.pixels[module]
        return params, macs

    def pruned(self, removed: set[int]) -> nn.Module:
        """A copy of the model without the ``removed`` channels (every layer sliced; depthwise groups follow)."""
        if removed & self.unprunable:
            raise ValueError("an unprunable channel cannot be removed")
        model = copy.deepcopy(self.model)
        modules = dict(model.named_modules())
        removed = np.fromiter(removed, np.int64, len(removed))
        touched: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        for (module, param), dims in self.dims.items():
            touched.setdefault(module, {})[param] = {d: self._kept(a, removed) for d, a in dims.items()}
        with torch.no_grad():
            for module, params in touched.items():
                m = modules[module]
                for param, dims in params.items():
                    t = getattr(m, param)
                    for d, keep in dims.items():
                        t = t.index_select(d, torch.nonzero(keep).flatten().to(t.device))
                    if isinstance(getattr(m, param), nn.Parameter):
                        setattr(m, param, nn.Parameter(t.clone(), requires_grad=getattr(m, param).requires_grad))
                    else:
                        setattr(m, param, t.clone())
                _resize(m)
            for module, sides in self.pads.items():
                m = modules[module]
                for attribute, atoms in zip(m.channel_padding, sides):
                    setattr(m, attribute, int(self._kept(atoms, removed).sum()))
        return model

    def masked(self, removed: set[int]) -> fx.GraphModule:
        """The unmodified network, traced, with every tensor multiplied by 0 at the removed channels' atoms."""
        gm = copy.deepcopy(self.gm)
        removed = np.fromiter(removed, np.int64, len(removed))
        for node in list(gm.graph.nodes):
            atoms = self.atoms.get(node.name)
            if atoms is None or node.op in ("placeholder", "output"):
                continue
            keep = self._kept(atoms, removed)
            if bool(keep.all()):
                continue
            shape = self._shape(node)
            mask = keep.float().reshape(1, -1, *([1] * (len(shape) - 2)))
            name = f"_mask_{node.name}"
            gm.register_buffer(name, mask.to(next(iter(gm.buffers()), mask).device))
            with gm.graph.inserting_after(node):
                getter = gm.graph.get_attr(name)
            with gm.graph.inserting_after(getter):
                product = gm.graph.call_function(operator.mul, (node, getter))
            node.replace_all_uses_with(product, delete_user_cb=lambda user, p=product: user is not p)
        gm.graph.lint()
        gm.recompile()
        return gm


def _resize(m: nn.Module) -> None:
    """A sliced layer's size attributes follow its tensors."""
    if isinstance(m, nn.Conv2d):
        if m.groups > 1:  # whole groups went (depthwise: one channel each); every group keeps its size
            m.groups = m.weight.shape[0] // (m.out_channels // m.groups)
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        m.num_features = m.running_mean.shape[0] if m.running_mean is not None else m.weight.shape[0]
