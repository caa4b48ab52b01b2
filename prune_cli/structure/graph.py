"""The channel dependency graph of any CNN or vision transformer, from a ``torch.fx`` trace: which channels go
together.

Every channel of every traced tensor is an *atom*; operations tie atoms together (a union-find), and a
*channel* (one prunable unit) is a class of tied atoms. The rules, one per kind of operation:

- conv / linear (groups 1): new atoms for its outputs; its weight's input dim is indexed by the input's atoms
  (a linear layer on [B, features], or on a channels-last [B, H, W, C] whose last dim holds the channels: a
  1 x 1 conv, MACs = weight elements x H x W; on another last dim, as a transformer's tokens, it is not mapped);
- ``permute`` / ``transpose`` / ``swapaxes`` (the ``Permute`` module too): the atoms move with the dim that
  holds them; on a channels-last tensor only the operations whose rules below find that dim are followed (a
  pool would read another dim as the channels: opaque);
- a view / reshape / flatten keeping the channels' dim whole (merging or splitting only the dims before it among
  themselves and those after it: patches [B, C, H, W] to [B, C, HW], tokens to windows): the atoms pass, their
  dim moved; a constant channel count among its sizes is the width attribute of the module whose code it is
  (an int attribute equal to it, as ViT's ``hidden_dim``), which surgery sets to the kept count (none: the
  channels are unprunable);
- ``cat`` along another dim than the channels (a class token before the tokens): the operands' channels tied; an
  operand computed from a parameter alone (the token, expanded to the batch) has that parameter's dim indexed;
  indexing that keeps the channels' dim whole (``x[:, 0]``, ``x[..., ::2, :]``) and means over other dims than
  the batch's and the channels' keep the atoms;
- self-attention of a known form (``attention.py``: ``nn.MultiheadAttention``, Swin's and MaxViT's window
  attention, the common ``qkv`` form): its input columns are the input's channels, its output projection's rows
  new atoms, and its q, k, v rows and the output projection's columns are *units*: whole heads
  (``attention="heads"``), one position of every head (``"head_width"``) or unprunable (``"none"``); per-head
  tensors are indexed by the heads; surgery rewrites or rebuilds the module; the masked network zeroes the
  removed units' q, k and v rows; its MACs are its projections' per token plus QK^T and AV (query x key pairs x
  the kept q and v rows);
- depthwise conv (groups = in = out channels): its output channel i *is* its input channel i (tied), and the
  layer's groups shrink with it; another grouped conv (groups G): each of its groups, inputs and outputs, is
  one channel (tied), so a whole group goes and G shrinks (every group keeps its size: the layer stays one conv);
- a layer is known by what it computes, not by its class: ``F.conv2d`` / ``F.linear`` / ``F.batch_norm`` /
  ``F.group_norm`` whose weight and bias are a module's own parameters (read directly, or computed from them by
  elementwise operations and reductions with ``keepdim``, as weight standardisation does) are mapped as the
  layers; a weight dim such a computation reduces over (standardisation's input dim) is not sliceable, so its
  channels are unprunable (removing one would change the statistics of the rest); a grouped functional conv or a
  functional GroupNorm only on a ``Conv2d`` / ``GroupNorm`` module's parameters (whose ``groups`` /
  ``num_groups`` then shrink); subclasses of the torch layers that keep their forward are the layers;
- GroupNorm (module or functional): each norm group's channels are one channel (tied: a group goes whole, its
  statistics never mix a removed channel with kept ones), and ``num_groups`` shrinks with ``num_channels``;
  LayerNorm over the channels (``nn.LayerNorm`` or ``F.layer_norm`` on the channels-last dim: ConvNeXt's,
  ``LayerNorm2d``'s, a transformer's): its weight and bias are indexed by the channels, which pass through; its
  mean and variance run over the channels there are, so removing one changes the others' statistics: the
  masked network (:meth:`ChannelGraph.masked`) normalises over the kept channels alone, as the pruned one does
  (a zeroed channel alone is no removed one there);
- BatchNorm, activations, pooling, dropout, stochastic depth, identity, ``nn.Upsample`` / ``F.interpolate``: the
  same atoms pass through;
- ``+ - * /`` of two tensors with the same channel count: channel i of every operand tied (residual sums,
  squeeze-excitation's ``x * scale``); an operand with one channel (or none) broadcasts and ties nothing; a
  module's parameter with one value per channel (broadcasting aligns dims from the right: a layer scale
  [C, 1, 1] on [B, C, H, W]) has that dim indexed by the channels' atoms (sliced and counted with them);
- ``cat`` along channels: the operands' atoms one after another (DenseNet; Swin's patch merging, four times);
- ``chunk(n, 1)``, and ``split(s, 1)`` with ``s = x.shape[1] // n`` computed at run time: each piece has its
  channel range's atoms, and channel j of every piece is tied (the pieces keep equal widths, so the pruned
  network's own split still splits right); a slice ``x[:, a:b]`` / ``narrow`` / ``split`` with constant sizes:
  each piece has its range's atoms, and the channels the constants count (those before ``a`` and before ``b``,
  or after them for negative bounds) are unprunable, the only way the constants stay right; a partial residual
  add (``cat([x1 + f(x1), x2])``) then follows from the rules above;
- channel shuffle (``view(B, g, C // g, H, W)``, ``transpose(1, 2)``, ``view(B, C, H, W)``): a permutation of
  the atoms; the constant dim of the split view (``g`` here) keeps its size, so the atoms of each of the other
  dim's positions (a shuffle column: channel j of every group) are tied and go together; a view whose split
  sizes are both constants, or a merge back to a constant width, keeps its channels unprunable;
- ``flatten`` / ``view(B, -1)`` of [B, C, H, W]: each atom repeated H x W times (a linear layer's input dim
  then holds H x W columns per channel); a view to a constant width (``view(B, 512)``) keeps its channels
  unprunable (the pruned network's view could not follow);
- pools over the spatial dims keep the atoms; anything else (reshapes or permutes across channels,
  unknown modules with parameters, custom functions, split pieces or channel grids read any other way than
  above): every atom it touches is unprunable, with a warning naming the operation. Computations on parameters
  alone (a weight's standardisation) have no atoms.

Every mode: a network that computes other things in training mode (GoogLeNet's and Inception's auxiliary heads,
which run only then) is traced in both modes, and both traces' atoms join one union-find (a layer's parameters
are shared, so its dims tie the two); the training-mode output (a tuple or named tuple of logits) is the
network's output too. The network must run in training mode on the example (a batch of one goes twice, for
BatchNorm; Inception v3's auxiliary head needs 299 x 299), else it is refused in one line. ``count`` counts
every parameter once (auxiliary heads included); its MACs are the eval-mode forward's (what inference costs: a
layer that runs only in training mode adds none), each layer's weight elements x output pixels, summed over its
calls.

Tracing (``trace.py``): symbolic first, else on the concrete example; the graph then holds for the example's
input size.

Masking (the stages zero a channel's producer rows, biases, norm entries and the per-channel parameters added to
it, as a position embedding or a class token) equals removing it only where no
conv or linear layer reads the channel nonzero: ``live`` follows which channels of each tensor may be nonzero
though masked (after a sigmoid or a ``+ c``; a product is zero when a factor is), and ``unsafe`` holds those a layer
reads. The network's input and output channels are unprunable. A *group* is the set of channels that live in the
same layers (a conv's outputs; a residual stream's channels, shared by every block writing into it). Removing a
channel removes its atoms everywhere: the producers' output rows, the BN entries, the consumers' input
columns. :meth:`ChannelGraph.masked` is the separate check: the unmodified network with every traced tensor
multiplied by 0 at the removed channels' atoms (in each mode, that mode's trace).
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prune_cli.structure import attention as attn
from prune_cli.structure.trace import INPUT, traces

SWIN = "torchvision.models.swin_transformer"  # its patch merging is one traced function
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
    nn.Upsample,  # UpsamplingNearest2d / UpsamplingBilinear2d are subclasses
)
ACTIVATION_FUNCTIONS = {  # the functional nonlinearities, by the module's name
    torch.relu: "ReLU",
    F.relu: "ReLU",
    F.relu6: "ReLU6",
    F.silu: "SiLU",
    F.gelu: "GELU",
    F.hardswish: "Hardswish",
    F.hardsigmoid: "Hardsigmoid",
    torch.sigmoid: "Sigmoid",
    torch.tanh: "Tanh",
}
PASS_FUNCTIONS = set(ACTIVATION_FUNCTIONS) | {
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
}
SHIFTING_MODULES = (nn.Sigmoid, nn.Hardsigmoid)  # they map 0 to 0.5: a zeroed channel stops being zero
SHIFTING_FUNCTIONS = {torch.sigmoid, F.hardsigmoid}
MULTIPLYING = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}  # 0 times a finite factor is 0
DIVIDING = {operator.truediv, torch.div, "div"}  # 0 / c is 0 (a masked channel must not divide: 0 / 0)
IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
PASS_METHODS = {"relu", "relu_", "sigmoid", "contiguous", "clone", "detach", "float"}
ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv}
ELEMENTWISE |= {torch.add, torch.sub, torch.mul, torch.div}
ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "div"}
# what a weight may be computed by from its module's parameters (row i of the result from row i of each)
WEIGHT_FUNCTIONS = ELEMENTWISE | {operator.neg, operator.pow, torch.sqrt, torch.rsqrt, torch.abs, torch.pow}
WEIGHT_FUNCTIONS |= {torch.clamp, torch.exp, torch.neg, torch.sign, torch.tanh, torch.sigmoid}
WEIGHT_METHODS = ELEMENTWISE_METHODS | {"sqrt", "rsqrt", "abs", "pow", "clamp", "clamp_min", "clamp_max", "neg"}
WEIGHT_METHODS |= {"exp", "sign", "to", "float", "contiguous", "detach", "type_as", "expand"}
REDUCING_FUNCTIONS = {torch.mean, torch.var, torch.std, torch.sum, torch.amax, torch.amin}
REDUCING_FUNCTIONS |= {torch.var_mean, torch.std_mean}
REDUCING_METHODS = {"mean", "var", "std", "sum", "amax", "amin"}
SPLITTING = {torch.split, torch.chunk, torch.narrow, "split", "chunk", "narrow"}
TRANSPOSING = {torch.transpose, "transpose", "permute", torch.permute, torch.swapaxes, "swapaxes"}
# what the rules follow on a channels-last tensor: elementwise, permutes, linear layers, layer norms
CHANNELS_LAST_MODULES = ACTIVATION_MODULES + (nn.Identity, nn.Dropout, nn.Linear, nn.LayerNorm)
# (and views, concatenations and indexing, whose rules find the channels' dim)
CHANNELS_LAST_FUNCTIONS = set(ACTIVATION_FUNCTIONS) | ELEMENTWISE | TRANSPOSING | {F.dropout, F.linear, F.layer_norm}
CHANNELS_LAST_FUNCTIONS |= {torch.reshape, torch.cat, operator.getitem, torch.flatten, torch.mean}
CHANNELS_LAST_METHODS = PASS_METHODS | ELEMENTWISE_METHODS | TRANSPOSING | {"view", "reshape", "flatten", "mean"}


def _stochastic_depth() -> tuple[type, ...]:
    """torchvision's stochastic depth (drops whole samples: channel-preserving), as a module."""
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # torchvision is a dependency, but the graph itself does not need it
        return ()
    return (StochasticDepth,)


def _arg(node: fx.Node, i: int, name: str, default=None):
    """A node's argument by position or keyword."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@dataclass
class _Trace:
    """One mode's trace and what propagation learnt of it: per node, its channels' atoms, which of them may be
    nonzero though masked, and the dim holding them; the layer norms over the channels."""

    training: bool
    gm: fx.GraphModule
    atoms: dict[str, np.ndarray]
    live: dict[str, np.ndarray]
    cdim: dict[str, int]
    layer_norms: set[str]


@dataclass
class Group:
    """Channels that live in the same layers: removing one removes its rows / columns in each of ``layers``."""

    name: str  # its first producer (the layer whose output rows it is)
    channels: list[int]  # channel (class) ids, in the producer's output order
    layers: list[str] = field(default_factory=list)


class _BothModes(nn.Module):
    """A masked network whose modes trace differently: each mode runs its own trace (the modules are shared)."""

    def __init__(self, eval_trace: fx.GraphModule, train_trace: fx.GraphModule):
        super().__init__()
        self.eval_trace, self.train_trace = eval_trace, train_trace

    def forward(self, *args, **kwargs):
        return (self.train_trace if self.training else self.eval_trace)(*args, **kwargs)


class ChannelGraph:
    """Coupled channels of ``model`` (traced on ``example``, one batch of inputs, in every mode)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, attention: str = "heads"):
        if attention not in attn.MODES:
            raise ValueError(f"attention must be one of {attn.MODES}, got {attention!r}")
        self.model = model
        self.modules = dict(model.named_modules())
        self.attention = attention  # what goes of an attention layer: whole heads, a width of every head, or nothing
        self.parent: list[int] = []
        self.blocked: set[int] = set()
        self.why: dict[int, str] = {}  # a blocked atom -> the operation that blocked it
        self.dims: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # (module, param) -> {dim: atoms}
        self.pixels: dict[tuple[str, str], int] = {}  # (module, weight) -> output pixels per image, eval-mode calls
        self.pads: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # padding module -> atoms it pads before / after
        self.norm_groups: dict[str, np.ndarray] = {}  # GroupNorm module -> the atoms it normalises
        self.width_attributes: dict[tuple[str, str], np.ndarray] = {}  # (module, int attribute) -> atoms it counts
        self.attentions: dict[str, tuple[np.ndarray, int, int, float]] = {}  # module -> (units, heads, width, scale)
        self.inner: dict[tuple[str, str], np.ndarray] = {}  # a leaf's tensor -> the units of its rows (masked: zeroed)
        self.matmuls: list[tuple[np.ndarray, int]] = []  # attention's (units of q's rows, query x key tokens / image)
        self.unsafe: set[int] = set()  # atoms a conv / linear layer reads while live: the mask would not remove them
        self.activations: set[str] = set()  # the nonlinearities the network applies (ReLU, SiLU, ...)
        self.warnings: list[str] = []
        self.traces: list[_Trace] = []
        for training, gm in traces(model, example):
            self.training, self.gm = training, gm
            self.atoms: dict[str, np.ndarray] = {}  # node name -> atom per channel (None: no channel dim)
            # per traced tensor: which channels may be nonzero when their channel's producer rows and BatchNorm
            # entries are zeroed (the stages' mask): after a sigmoid or a "+ 1", say; a multiplication by a zero
            # channel or a layer whose rows are zeroed makes them zero again
            self.live: dict[str, np.ndarray] = {}
            self.derived: set[str] = set()  # nodes computed from parameters alone (a standardised weight)
            self.pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # a split -> its pieces' (atoms, live)
            self.grids: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # a channel-split view -> 2-D (atoms, live)
            self.cdim: dict[str, int] = {}  # node name -> the dim holding its channels (1 unless permuted)
            self.layer_norms: set[str] = set()  # the layer norms over the channels (masked: over the kept ones)
            self._propagate()
            self.traces.append(_Trace(training, gm, self.atoms, self.live, self.cdim, self.layer_norms))
        first = self.traces[0]
        self.gm, self.atoms, self.live, self.cdim = first.gm, first.atoms, first.live, first.cdim
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

    def _tie_rows(self, grid: np.ndarray) -> None:
        """Every row of ``grid`` one channel: its atoms tied."""
        for row in grid:
            self._tie(np.full(len(row) - 1, row[0]), row[1:])

    def _read(self, arg) -> None:
        """A conv / linear layer reads ``arg``: its live channels (nonzero though masked) make masking no removal."""
        atoms = self._of(arg)
        if atoms is not None:
            self.unsafe.update(atoms[self.live[arg.name]].tolist())

    def _block(self, atoms, why: str) -> None:
        for a in np.asarray(atoms).ravel().tolist():
            self.blocked.add(a)
            self.why.setdefault(a, why)

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:  # the training-mode trace meets the same operations again
            self.warnings.append(msg)
            warnings.warn(msg, stacklevel=4)

    # ------------------------------------------------------------------ propagation over the trace

    @staticmethod
    def _shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _of(self, arg) -> np.ndarray | None:
        return self.atoms.get(arg.name) if isinstance(arg, fx.Node) else None

    def _tensor(self, module: str, name: str) -> torch.Tensor:
        """A module's parameter or buffer, by the module's name and its own."""
        return getattr(self.modules[module], name)

    def _opaque(self, node, what: str) -> None:
        """An operation the graph cannot map: every channel it touches is unprunable."""
        touched = self._carried(node)
        if touched:
            self._warn(f"{what} ({node.name}) cannot be mapped: the channels it touches are unprunable")
        for t in touched:
            self._block(t, what)
        shape = self._shape(node)
        if shape is not None and len(shape) >= 2:
            out = self._new(shape[1])
            self._block(out, what)
            self.atoms[node.name] = out
            self.cdim[node.name] = 1  # new atoms along dim 1, whatever layout its inputs had

    def _parametric(self, node) -> bool:
        """Is ``node`` computed from parameters alone (a weight's standardisation, a counter's update)?"""
        inputs = node.all_input_nodes
        params = [a for a in inputs if a.op == "get_attr" or a.name in self.derived]
        sizes = [a for a in inputs if a not in params and self._is_size(a)]  # x.shape[0]: numbers, no tensor
        return node.op in ("call_function", "call_method") and bool(params) and len(params) + len(sizes) == len(inputs)

    def _is_size(self, node) -> bool:
        """Is ``node`` a number or sizes (``x.shape[0]``), no tensor?"""
        return self._shape(node) is None and self._of(node) is None and node.name not in self.pieces

    def _propagate(self) -> None:
        for node in self.gm.graph.nodes:
            shape = self._shape(node)
            if self._parametric(node):
                self.derived.add(node.name)
                continue
            if node.op == INPUT:
                if shape is not None and len(shape) >= 2:
                    self.atoms[node.name] = self._new(shape[1])
                    self._block(self.atoms[node.name], "the network's input")
            elif node.op == "output":  # every tensor it returns, in a (named) tuple or not
                for atoms in self._carried(node):
                    self._block(atoms, "the network's output")
            elif self._unfollowed(node):  # a channel grid or a tuple of pieces read some other way
                self._opaque(node, f"{getattr(node.target, '__name__', node.target)} of pieces of the channels")
            elif node.args and getattr(node.args[0], "name", None) in self.grids:
                self._grid(node, shape)
            elif not self._follows_channels_last(node):
                self._opaque(node, f"{getattr(node.target, '__name__', node.target)} of a channels-last tensor")
            elif node.op == "call_module":
                self._module(node, self.modules[node.target])
            elif node.op == "call_function":
                self._function(node, node.target, shape)
            elif node.op == "call_method":
                self._method(node, shape)
            # get_attr (a parameter or buffer read directly) has no atoms of its own
            self._follow_cdim(node)
            self._follow_live(node)

    def _channel_dim(self, arg) -> int:
        """The dim of ``arg`` that holds its channels: 1, or where a permute moved it (channels last)."""
        return self.cdim.get(arg.name, 1) if isinstance(arg, fx.Node) else 1

    def _follows_channels_last(self, node) -> bool:
        """Can the rules follow ``node`` on its inputs? Only the operations whose rules know where a channels-last
        tensor keeps its channels (elementwise ones, permutes, views, linear layers, layer norms, attention, ...;
        a pool would read H as C)."""
        if all(self._channel_dim(a) == 1 for a in node.all_input_nodes if self._of(a) is not None):
            return True
        if node.op != "output" and self._shape(node) is None:  # x.shape, x.size(): no channels of its own
            return True
        if node.op == "call_module":
            m = self.modules[node.target]
            return isinstance(m, CHANNELS_LAST_MODULES + _stochastic_depth()) or attn.form(m) is not None
        if node.op == "call_function":
            where = getattr(node.target, "__module__", "")
            merging = where == SWIN and node.target.__name__ == "_patch_merging_pad"
            return (
                merging
                or where.startswith("torchvision.ops.stochastic_depth")
                or node.target in CHANNELS_LAST_FUNCTIONS
            )
        return node.op == "output" or (node.op == "call_method" and node.target in CHANNELS_LAST_METHODS)

    def _follow_cdim(self, node) -> None:
        """A node's channel dim where no rule set it: its first channel-carrying input's (passed through)."""
        if self.atoms.get(node.name) is not None and node.name not in self.cdim:
            first = next((a for a in node.all_input_nodes if self._of(a) is not None), None)
            if first is not None and self._channel_dim(first) != 1:
                self.cdim[node.name] = self._channel_dim(first)

    def _carried(self, node) -> list[np.ndarray]:
        """The atoms of every channel ``node`` reads: its inputs', their pieces' and their grids'."""
        found = []
        for a in node.all_input_nodes:
            found += [self._of(a), self.grids.get(a.name, (None, None))[0]]
            found += [p for p, _ in self.pieces.get(a.name, [])]
        return [atoms for atoms in found if atoms is not None]

    def _unfollowed(self, node) -> bool:
        """Does ``node`` read a tuple of pieces other than by taking one, or a channel grid other than as the
        operand of a grid operation (``_grid``)?"""
        first = node.args[0] if node.args else None
        index = node.args[1] if node.target is operator.getitem and len(node.args) > 1 else None
        taking = isinstance(index, int | slice) or node.target is torch.cat  # one piece, some, or all in a row
        for a in node.all_input_nodes:
            if a.name in self.pieces and not (taking and a is first):
                return True
            if a.name in self.grids and a is not first:
                return True
        return False

    def _follow_live(self, node) -> None:
        """A node's live channels where no rule set them (passed through: as its input's), and an in-place
        operation's on the tensor it overwrites."""
        if self.atoms.get(node.name) is not None and node.name not in self.live:
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
        weight = [(node.target, "weight")]
        bias = [(node.target, "bias")] if getattr(m, "bias", None) is not None else []
        if attn.form(m) is not None:
            self._attention(node, m)
        elif isinstance(m, nn.Conv2d):
            self._conv(node, x, (weight, set()), bias, m.groups, m, tuple(m.weight.shape))
        elif isinstance(m, nn.Linear):
            self._linear(node, x, (weight, set()), bias, tuple(m.weight.shape))
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm):
            names = ("weight", "bias", "running_mean", "running_var")
            own = [(node.target, p) for p in names if isinstance(getattr(m, p, None), torch.Tensor)]
            if isinstance(m, nn.GroupNorm):
                self._group_norm(node, x, m.num_groups, own, node.target)
            else:
                self._norm(node, x, own)
        elif isinstance(m, PASS_MODULES + _stochastic_depth()):
            self.atoms[node.name] = x
            if isinstance(m, ACTIVATION_MODULES):
                self.activations.add(type(m).__name__)
            if isinstance(m, SHIFTING_MODULES) and x is not None:
                self.live[node.name] = np.ones(len(x), bool)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, x, m.start_dim, m.end_dim)
        elif isinstance(m, nn.LayerNorm):
            own = [(node.target, p) for p in ("weight", "bias") if getattr(m, p, None) is not None]
            self._layer_norm(node, x, len(m.normalized_shape), own)
        else:
            self._opaque(node, f"module {node.target} ({type(m).__name__})")

    # ------------------------------------------------------------------ layers: modules and functional calls

    def _fits(self, params: list[tuple[str, str]], shape: tuple[int, ...]) -> bool:
        """Do the parameters ``params`` index a weight of ``shape`` dim by dim (each dim the same size, or 1)?"""
        for module, name in params:
            p = tuple(self._tensor(module, name).shape)
            if len(p) != len(shape) or any(a not in (1, b) for a, b in zip(p, shape)):
                return False
        return True

    def _index_params(self, node, params, shape, reduced: set[int], index: dict[int, np.ndarray]) -> None:
        """Index every parameter in ``params`` (making a weight of ``shape``) by ``index``: {dim: atoms}; the atoms
        of a dim the weight's computation reduces over are unprunable (removing one changes the statistics)."""
        for module, name in params:
            p = tuple(self._tensor(module, name).shape)
            self._param(module, name, {d: atoms for d, atoms in index.items() if p[d] == shape[d]})
        for d in sorted(reduced & set(index)):
            self._block(index[d], f"a weight computed by a reduction over its dim {d} ({node.name})")

    def _macs(self, node, params, shape, linear: bool) -> None:
        """The eval-mode forward's output pixels per image of a conv / linear layer (a linear layer: per position
        of its input), by its full-size parameter; summed over the layer's calls."""
        full = next(((m, p) for m, p in params if tuple(self._tensor(m, p).shape) == shape), None)
        out = self._shape(node)
        if full is not None and out is not None and not self.training:
            self.pixels[full] = self.pixels.get(full, 0) + int(np.prod(out[1:-1] if linear else out[2:]))

    def _conv(self, node, x, weight, bias, groups: int, owner, shape) -> None:
        """A conv's output channels: new atoms (groups 1), its input's (depthwise), or tied to their group's inputs.
        ``weight``: ([(module, parameter)] it is computed from, the dims reduced over); ``bias``: [(module, name)];
        a grouped conv only on a ``Conv2d``'s parameters (its ``groups`` shrink with it)."""
        params, reduced = weight
        self._macs(node, params, shape, linear=False)
        if x is None or not self._fits(params, shape) or not self._fits(bias, shape[:1]):
            self._opaque(node, f"conv {node.name} on parameters it cannot index")
            return
        if groups > 1 and not (isinstance(owner, nn.Conv2d) and owner.groups == groups):
            self._opaque(node, f"grouped conv {node.name} on parameters of {type(owner).__name__} (fixed groups)")
            return
        if groups == 1:
            out = self._new(shape[0])
            self._read(node.args[0])
            index = {0: out, 1: x}
        elif groups == len(x) == shape[0]:
            out = x  # depthwise: output channel i is input channel i
            index = {0: out}
        else:  # grouped: group g's inputs and outputs go together, so only whole groups go
            out = self._new(shape[0])
            self._tie_rows(np.concatenate([x.reshape(groups, -1), out.reshape(groups, -1)], axis=1))
            index = {0: out}  # its input dim indexes within a group: it stays
        self._index_params(node, params, shape, reduced, index)
        self._index_params(node, bias, shape[:1], set(), {0: out})
        self.atoms[node.name] = out
        self.live[node.name] = np.zeros(len(out), bool)  # a masked channel's rows and bias are zero

    def _linear(self, node, x, weight, bias, shape) -> None:
        """A linear layer on [B, features], or on the channels of a channels-last tensor [B, H, W, C] (a 1 x 1
        conv): new atoms for its outputs; on other inputs (a last dim that is not the channels) it is opaque."""
        params, reduced = weight
        self._macs(node, params, shape, linear=True)
        src = self._shape(node.args[0])
        # a linear layer reads the last dim: only where that dim holds the atoms can it be mapped
        if x is None or src is None or self._channel_dim(node.args[0]) != len(src) - 1 or len(x) != shape[1]:
            self._opaque(node, f"linear layer {node.name} on a tensor of {len(src or ())} dims (channels last)")
            return
        if not self._fits(params, shape) or not self._fits(bias, shape[:1]):
            self._opaque(node, f"linear layer {node.name} on parameters it cannot index")
            return
        out = self._new(shape[0])
        self._read(node.args[0])
        self._index_params(node, params, shape, reduced, {0: out, 1: x})
        self._index_params(node, bias, shape[:1], set(), {0: out})
        self.atoms[node.name] = out
        self.live[node.name] = np.zeros(len(out), bool)

    def _norm(self, node, x, params) -> None:
        """A BatchNorm: its parameters and running statistics indexed by its input's atoms, which pass through."""
        if x is not None and not self._fits(params, (len(x),)):
            self._opaque(node, f"batch norm {node.name} on parameters it cannot index")
            return
        for module, name in params:
            self._param(module, name, {0: x})
        self.atoms[node.name] = x
        if x is not None:
            self.live[node.name] = np.zeros(len(x), bool)  # gamma and beta zeroed: 0 whatever comes in

    def _group_norm(self, node, x, num_groups, params, owner: str | None) -> None:
        """A GroupNorm: each norm group's channels tied into one (a group goes whole, so no kept channel's
        statistics change); its parameters indexed by the atoms; ``num_groups`` shrinks with them."""
        fixed = owner is None or not isinstance(self.modules.get(owner), nn.GroupNorm)
        if x is None or fixed or len(x) % num_groups or not self._fits(params, (len(x),)):
            self._opaque(node, f"group norm {node.name} (its groups fixed by the code)")
            return
        self._tie_rows(x.reshape(num_groups, -1))
        for module, name in params:
            self._param(module, name, {0: x})
        if owner in self.norm_groups:
            self._tie(self.norm_groups[owner], x)
        self.norm_groups.setdefault(owner, x)
        self.atoms[node.name] = x
        self.live[node.name] = np.zeros(len(x), bool)  # a removed group is zero in, so zero out (beta zeroed)

    def _layer_norm(self, node, x, normalised_dims: int, params: list[tuple[str, str]] | None) -> None:
        """A LayerNorm over the channels alone (the last dim of a channels-last tensor: ConvNeXt's, a transformer's):
        its ``params`` (weight, bias) indexed by the channels, which pass through; the masked network normalises it
        over the kept channels alone (``_masked``). Over other dims, or on a weight computed otherwise, opaque."""
        src = self._shape(node.args[0])
        if x is None or src is None or normalised_dims != 1 or self._channel_dim(node.args[0]) != len(src) - 1:
            self._opaque(node, f"layer norm {node.name} over other dims than the channels")
            return
        owners = {self.modules[module] for module, _ in params or []}
        if not params or not self._fits(params, (len(x),)) or not all(isinstance(m, nn.LayerNorm) for m in owners):
            # its width is then a constant of the code (``normalized_shape``) surgery could not follow
            self._opaque(node, f"layer norm {node.name} without a LayerNorm's weight and bias to slice")
            return
        for module, name in params:
            self._param(module, name, {0: x})
        self.layer_norms.add(node.name)
        self.atoms[node.name] = x
        self.live[node.name] = np.zeros(len(x), bool)  # its gamma and beta zeroed: 0 whatever comes in

    def _attention(self, node, m: nn.Module) -> None:
        """Self-attention of a known form (``attention.py``) on a channels-last input: its q, k, v rows indexed by
        units (whole heads or a position of every head, by ``attention``; ``"none"``: every row its own
        unprunable atom), its input columns by the input's channels, its output projection's columns by the units
        and its rows by new atoms, its per-head tensors by the heads; the matmuls QK^T and AV counted per unit."""
        query = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        x, src = self._of(query), self._shape(query)
        why = attn.refusal(m, node, query, self.attention)
        if why is None and (x is None or src is None or len(src) != attn.PARTS[attn.form(m)][3]):
            why = "an input of other dims than its form's"
        if why is None and self._channel_dim(query) != len(src) - 1:
            why = "an input whose channels are not its last dim"
        if why is not None:
            self._opaque(node, f"attention {node.target} ({why})")
            return
        weight, proj, heads, width = attn.parts(m)
        inner, _, name = f"{node.target}.{weight}".rpartition(".")
        proj = f"{node.target}.{proj}"
        units, rows = self._units(node.target, heads, width)
        packed = np.tile(rows, 3)  # q, k, v
        self._read(query)
        out = self._new(self.modules[proj].weight.shape[0])
        bias = "in_proj_bias" if name == "in_proj_weight" else "bias"
        tensors = [(inner, name, {0: packed, 1: x}), (inner, bias, {0: packed}), (proj, "weight", {0: out, 1: rows})]
        tensors.append((proj, "bias", {0: out}))
        if self.attention == "heads":
            tensors += [(f"{node.target}.{m_}".rstrip("."), p, {d: units}) for m_, p, d in attn.per_head(m)]
        for module, param, dims in tensors:
            if getattr(self.modules[module], param, None) is not None:
                self._param(module, param, dims)
        for key in ((inner, name), (inner, bias)):
            if getattr(self.modules[inner], key[1], None) is not None:
                self.inner[key] = packed
        self.attentions.setdefault(node.target, (units, heads, width, attn.scale(m)))
        if not self.training:
            self._attention_macs(node.target, m, src, [(inner, name), (proj, "weight")], rows)
        self.cdim[node.name] = len(src) - 1
        if attn.form(m) in ("multihead", "head"):  # (output, weights)
            self.pieces[node.name] = [(out, np.zeros(len(out), bool)), (None, None)]
        else:
            self.atoms[node.name], self.live[node.name] = out, np.zeros(len(out), bool)

    def _units(self, module: str, heads: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """An attention module's units (the same in both modes' traces) and the unit of each row of q (or k, v)."""
        if self.attention == "none":
            units = self._new(heads * width)
            self._block(units, f"attention heads kept whole (attention='none', {module})")
            rows = units
        else:
            units = self._new(heads if self.attention == "heads" else width)
            rows = attn.unit_rows(units, self.attention, heads, width)
        if module in self.attentions:  # the other mode's trace: the same units
            self._tie(self.attentions[module][0], units)
        return units, rows

    def _attention_macs(self, module: str, m: nn.Module, src, projections, rows: np.ndarray) -> None:
        """An attention call's MACs per image: its projections once per token, QK^T and AV once per query-key pair
        and kept unit row, Swin v2's position bias MLP once per relative position."""
        tokens, pairs = attn.tokens(m, src)
        for key in projections:
            self.pixels[key] = self.pixels.get(key, 0) + tokens
        self.matmuls.append((rows, pairs))
        if hasattr(m, "cpb_mlp"):
            positions = int(np.prod(m.relative_coords_table.shape[:-1]))
            for layer in (f"{module}.cpb_mlp.0", f"{module}.cpb_mlp.2"):
                self.pixels[(layer, "weight")] = self.pixels.get((layer, "weight"), 0) + positions

    def _sources(self, arg) -> tuple[list[tuple[str, str]], set[int]] | None:
        """The module parameters a weight is computed from, and the dims a reduction in that computation runs over
        (row i from row i elsewhere); None when it is computed otherwise (or is no parameter)."""
        if arg is None:
            return [], set()
        if not isinstance(arg, fx.Node):
            return None
        if arg.op == "get_attr":
            module, _, name = arg.target.rpartition(".")
            ok = module in self.modules and isinstance(getattr(self.modules[module], name, None), torch.Tensor)
            return ([(module, name)], set()) if ok else None
        if arg.name not in self.derived:
            return None
        fn = arg.target
        reducing = fn in REDUCING_FUNCTIONS or (arg.op == "call_method" and fn in REDUCING_METHODS)
        pure = fn in WEIGHT_FUNCTIONS or (arg.op == "call_method" and fn in WEIGHT_METHODS)
        picking = fn is operator.getitem and isinstance(arg.args[1], int)  # one result of var_mean
        if not (reducing or pure or picking):
            return None
        params, reduced = [], set()
        for a in arg.all_input_nodes:
            if a.op != "get_attr" and a.name not in self.derived and self._is_size(a):
                continue  # the sizes of an expand
            found = self._sources(a)
            if found is None:
                return None
            params += [p for p in found[0] if p not in params]
            reduced |= found[1]
        if reducing:
            src = self._shape(arg.args[0])
            meta = arg.meta.get("tensor_meta")
            meta = meta if hasattr(meta, "shape") or meta is None else meta[0]  # var_mean: two tensors
            dims = _arg(arg, 1, "dim")
            if src is None or meta is None or len(meta.shape) != len(src):  # without keepdim rows no longer line up
                return None
            dims = range(len(src)) if dims is None else [dims] if isinstance(dims, int) else dims
            reduced |= {d % len(src) for d in dims if src[d % len(src)] > 1}
        return params, reduced

    def _functional(self, node, fn) -> None:
        """``F.conv2d`` / ``F.linear`` / ``F.batch_norm`` / ``F.group_norm`` on a module's own parameters."""
        x = self._of(node.args[0])
        names = {
            F.conv2d: ("weight", "bias"),
            F.linear: ("weight", "bias"),
            F.batch_norm: ("running_mean", "running_var", "weight", "bias"),
            F.group_norm: ("num_groups", "weight", "bias"),
        }[fn]
        args = [_arg(node, i + 1, name) for i, name in enumerate(names)]
        found = [self._sources(a) for a in args if isinstance(a, fx.Node) or a is None]
        if any(f is None for f in found):
            self._opaque(node, f"function {fn.__name__} on a weight not computed from a module's parameters")
            return
        if fn is F.conv2d or fn is F.linear:
            weight, bias = found
            shape = self._shape(args[0])
            if not weight[0] or bias[1] or shape is None:
                self._opaque(node, f"function {fn.__name__} without a module's weight")
            elif fn is F.conv2d:
                owner = self.modules[weight[0][0][0]]
                self._conv(node, x, weight, bias[0], _arg(node, 6, "groups", 1), owner, shape)
            else:
                self._linear(node, x, weight, bias[0], shape)
            return
        params = [p for f in found for p in f[0]]
        if any(f[1] for f in found):
            self._opaque(node, f"function {fn.__name__} on parameters computed by a reduction")
        elif fn is F.batch_norm:
            self._norm(node, x, params)
        else:
            owner = params[0][0] if params else None
            self._group_norm(node, x, args[0], params, owner)

    # ------------------------------------------------------------------ functions and methods

    def _function(self, node, fn, shape) -> None:
        """A call of a function (``torch.*``, ``F.*``, an operator) on traced tensors, by the rules above."""
        first = node.args[0] if node.args else None
        if fn is operator.getitem and isinstance(first, fx.Node) and first.name in self.pieces:
            picked = self.pieces[first.name][node.args[1]]
            if isinstance(node.args[1], slice):  # some of the pieces, still a tuple
                self.pieces[node.name] = picked
            else:
                self.atoms[node.name], self.live[node.name] = picked
            if first.name in self.cdim:  # an attention's output: channels last
                self.cdim[node.name] = self.cdim[first.name]
        elif isinstance(fn, type) and issubclass(fn, tuple):  # a named tuple of outputs (GoogLeNetOutputs)
            items = [*node.args, *node.kwargs.values()]
            self.pieces[node.name] = [(self._of(a), self.live.get(getattr(a, "name", None))) for a in items]
        elif fn in PASS_FUNCTIONS or getattr(fn, "__module__", "").startswith("torchvision.ops.stochastic_depth"):
            self.atoms[node.name] = self._of(first)
            if fn in ACTIVATION_FUNCTIONS:
                self.activations.add(ACTIVATION_FUNCTIONS[fn])
            if fn in SHIFTING_FUNCTIONS and self._of(first) is not None:
                self.live[node.name] = np.ones(len(self._of(first)), bool)
        elif fn in (F.conv2d, F.linear, F.batch_norm, F.group_norm):
            self._functional(node, fn)
        elif fn is F.layer_norm:
            found = [self._sources(_arg(node, i, name)) for i, name in ((2, "weight"), (3, "bias"))]
            params = None if None in found or any(f[1] for f in found) else [p for f in found for p in f[0]]
            self._layer_norm(node, self._of(first), len(_arg(node, 1, "normalized_shape")), params)
        elif fn in ELEMENTWISE:
            self._elementwise(node, shape)
        elif fn is torch.cat:
            self._cat(node)
        elif getattr(fn, "__module__", "") == SWIN and fn.__name__ == "_patch_merging_pad":
            self._patch_merging(node)
        elif fn in SPLITTING:
            self._split(node, fn.__name__)
        elif fn is torch.reshape:
            self._reshape(node, shape)
        elif fn in TRANSPOSING and shape is not None:
            self._permute(node, shape)
        elif fn is torch.flatten:
            self._flatten(node, self._of(first), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif fn is torch.mean:
            self._reduce(node, _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)))
        elif fn is operator.getitem and shape is not None and self._of(first) is not None:
            self._getitem(node)
        elif fn is F.pad and len(shape or ()) == 4:
            self._pad(node)
        elif fn in (getattr, operator.getitem) and shape is None:
            pass  # x.shape, sizes: no channels
        else:
            self._opaque(node, f"function {getattr(fn, '__name__', fn)}")

    def _method(self, node, shape) -> None:
        """A tensor method (``x.view``, ``x.chunk``, ``x.relu``, ...) by the rules above."""
        name = node.target
        first = node.args[0]
        if name in PASS_METHODS:
            self.atoms[node.name] = self._of(first)
            if name in ("relu", "relu_", "sigmoid"):
                self.activations.add("ReLU" if name.startswith("relu") else "Sigmoid")
            if name == "sigmoid" and self._of(first) is not None:
                self.live[node.name] = np.ones(len(self._of(first)), bool)
        elif name in ELEMENTWISE_METHODS:
            self._elementwise(node, shape)
        elif name == "mean":
            self._reduce(node, _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)))
        elif name == "flatten":
            self._flatten(node, self._of(first), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif name in ("view", "reshape"):
            self._reshape(node, shape)
        elif name in TRANSPOSING and shape is not None:
            self._permute(node, shape)
        elif name in SPLITTING:
            self._split(node, name)
        elif name in ("size", "dim") or shape is None:
            pass
        else:
            self._opaque(node, f"method {name}")

    def _per_channel(self, node, shape) -> tuple[list[np.ndarray], list[tuple[str, str, int]]] | None:
        """The operands of an elementwise ``node`` that hold one value per channel (broadcasting aligns dims from
        the right): the traced ones' atoms, and the parameters (module, name, dim) read directly (a layer scale
        [C, 1, 1]); None when a per-channel operand is neither (surgery could not slice it) or lies otherwise."""
        tracked = [a for a in node.args if isinstance(a, fx.Node) and self._of(a) is not None]
        held = self._channel_dim(tracked[0]) if tracked else 1
        full, params = [], []
        for a in (a for a in node.args if isinstance(a, fx.Node)):
            s = self._shape(a)
            d = held - (len(shape) - len(s)) if s is not None else -1
            one = shape[held] <= 1 and (self._of(a) is None or self._channel_dim(a) != d)  # a traced channel: kept
            if d < 0 or s[d] != shape[held] or one:
                continue  # broadcast along the channels (one value for all), or no tensor
            if self._of(a) is not None and self._channel_dim(a) == d:
                full.append(self._of(a))
            elif self._of(a) is None and a.op == "get_attr" and self._sources(a):
                params += [(module, name, d) for module, name in self._sources(a)[0]]
            else:
                return None
        return full, params

    def _elementwise(self, node, shape) -> None:
        if shape is None or len(shape) < 2:
            self._opaque(node, f"{node.target} on tensors without channels")
            return
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        found = self._per_channel(node, shape)
        full, params = found if found is not None else ([], [])
        if not full:
            # a per-channel operand the graph cannot follow (a computed tensor multiplied in): surgery could not
            # slice it, so the channels stay
            self._opaque(node, f"{getattr(node.target, '__name__', node.target)} with an untracked per-channel operand")
            return
        divisor = node.args[1] if node.target in DIVIDING and len(node.args) > 1 else None
        if self._of(divisor) is not None and len(self._of(divisor)) == len(full[0]):
            self._opaque(node, "division by a per-channel tensor (a masked channel would divide by 0)")
            return
        for other in full[1:]:
            self._tie(full[0], other)
        for module, name, d in params:  # a layer scale: its dim indexed by the channels, sliced with them
            self._param(module, name, {d: full[0]})
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
            # a broadcast tensor added; a per-channel parameter added (a position embedding) is zeroed with its
            # channel by the mask, as a bias is
            indexed = sum(1 for a in operands if self._of(a) is None and a.op == "get_attr" and self._sources(a))
            broadcast = constant or len(operands) > len(full) + (indexed if params else 0)
            self.live[node.name] = np.ones(len(full[0]), bool) if broadcast else np.logical_or.reduce(tracked)

    def _cat(self, node) -> None:
        """``cat`` along the channels: the operands' atoms one after another (a split's pieces, too); along another
        dim: :meth:`_cat_tokens`."""
        tensors = node.args[0]
        if isinstance(tensors, fx.Node):  # the pieces of a split, as they are
            pieces = self.pieces.get(tensors.name, [(None, None)])
        else:
            pieces = [(self._of(t), self.live.get(getattr(t, "name", None))) for t in tensors]
        dim = _arg(node, 1, "dim", 0)
        ndim = len(self._shape(node))
        traced = [t for t in tensors if self._of(t) is not None] if not isinstance(tensors, fx.Node) else []
        held = self._channel_dim(traced[0]) if traced else 1
        if dim % ndim == held and all(p is not None for p, _ in pieces):
            self.atoms[node.name] = np.concatenate([p for p, _ in pieces])
            self.live[node.name] = np.concatenate([live for _, live in pieces])
        elif traced and dim % ndim != held:
            self._cat_tokens(node, tensors, traced, held)
        else:
            self._opaque(node, "cat along a dim other than the channels")

    def _cat_tokens(self, node, tensors, traced, held: int) -> None:
        """``cat`` along a dim that is not the channels (a class token before the tokens): every operand has the
        same channels, tied; an operand computed from a parameter alone (the token, expanded to the batch) has that
        parameter's dim (aligned from the right) indexed by them."""
        ndim, x = len(self._shape(node)), self._of(traced[0])
        if any(self._channel_dim(t) != held or len(self._of(t)) != len(x) for t in traced):
            self._opaque(node, "cat of tensors with other channels")
            return
        for t in traced[1:]:
            self._tie(x, self._of(t))
        for t in (t for t in tensors if t not in traced):
            found = self._sources(t) if isinstance(t, fx.Node) else None
            dims = [(m, n, self._tensor(m, n).dim() - (ndim - held)) for m, n in (found or ([], set()))[0]]
            if not found or found[1] or any(d < 0 or self._tensor(m, n).shape[d] != len(x) for m, n, d in dims):
                self._opaque(node, "cat with a tensor the graph cannot slice")
                return
            for module, name, d in dims:
                self._param(module, name, {d: x})
        self.atoms[node.name], self.cdim[node.name] = x, held  # the token parameter is zeroed with its channel
        self.live[node.name] = np.logical_or.reduce([self.live[t.name] for t in traced])

    def _patch_merging(self, node) -> None:
        """torchvision Swin's patch merging: [B, H, W, C] to [B, H / 2, W / 2, 4 C], the four 2 x 2 neighbours'
        channels one after another (every channel four times)."""
        src = node.args[0]
        x, shape = self._of(src), self._shape(src)
        if x is None or shape is None or self._channel_dim(src) != len(shape) - 1:
            self._opaque(node, "patch merging of a tensor without channels last")
            return
        self.atoms[node.name], self.live[node.name] = np.tile(x, 4), np.tile(self.live[src.name], 4)
        self.cdim[node.name] = len(shape) - 1

    # ------------------------------------------------------------------ pieces of the channels

    def _share_of(self, size, src: fx.Node) -> int | None:
        """n when ``size`` is ``src.shape[1] // n`` (or ``src.size(1) // n``), computed at run time; else None."""
        if not (isinstance(size, fx.Node) and size.target is operator.floordiv and isinstance(size.args[1], int)):
            return None
        width = size.args[0]
        if isinstance(width, fx.Node) and width.target == "size" and width.args[0] is src:
            return size.args[1] if _arg(width, 1, "dim") == 1 else None
        if not (isinstance(width, fx.Node) and width.target is operator.getitem and width.args[1] == 1):
            return None
        shape = width.args[0]
        of_src = isinstance(shape, fx.Node) and shape.args and shape.args[0] is src
        whole = of_src and ((shape.target is getattr and shape.args[1] == "shape") or shape.target == "size")
        return size.args[1] if whole and len(shape.args) <= 2 else None

    def _equal_parts(self, x: np.ndarray, n: int) -> np.ndarray:
        """``x`` in ``n`` equal parts whose channel j is one channel (the parts keep equal widths when pruned)."""
        parts = x.reshape(n, -1)
        self._tie_rows(parts.T)
        return parts

    def _split(self, node, name: str) -> None:
        """``split`` / ``chunk`` / ``narrow``: each piece its channel range (the rules in the module docstring)."""
        src = node.args[0]
        x, shape = self._of(src), self._shape(src)
        if x is None or shape is None:
            self._opaque(node, f"{name} of a tensor without channels")
            return
        if name == "narrow":
            dim, start, length = _arg(node, 1, "dim"), _arg(node, 2, "start"), _arg(node, 3, "length")
            if dim % len(shape) != 1:
                self.atoms[node.name] = x
            elif isinstance(start, int) and isinstance(length, int):
                self._range(node, src, start, start + length)
            else:
                self._opaque(node, f"narrow of the channels by computed bounds ({node.name})")
            return
        live, meta = self.live[src.name], node.meta.get("tensor_meta")
        widths = [m.shape[1] if len(m.shape) > 1 else 0 for m in meta]
        if _arg(node, 2, "dim", 0) % len(shape) != 1:
            self.pieces[node.name] = [(x, live)] * len(meta)  # along another dim: every piece has every channel
            return
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size", node.kwargs.get("chunks"))
        size = node.kwargs.get("split_size_or_sections", size)
        n = size if name == "chunk" else self._share_of(size, src)
        if isinstance(n, int) and len(x) % n == 0 and len(set(widths)) == 1:
            parts = self._equal_parts(x, n)
            self.pieces[node.name] = list(zip(parts, live.reshape(n, -1)))
            return
        self._block(x, f"{name} into constant sizes ({node.name})")  # the pruned network would split the same
        ends = np.cumsum(widths)
        self.pieces[node.name] = [(x[e - w : e], live[e - w : e]) for w, e in zip(widths, ends)]

    def _range(self, node, src: fx.Node, start, stop) -> None:
        """A slice ``[start:stop]`` of ``src``'s channels: a constant bound keeps the channels it counts (those
        before it, or after it when negative) unprunable; a bound ``C // n`` computed at run time ties the n
        parts' channel j together instead."""
        x, live = self._of(src), self.live[src.name]
        bounds = []
        for b in (start, stop):
            if isinstance(b, fx.Node):
                n = self._share_of(b, src)
                if n is None or len(x) % n:
                    self._opaque(node, f"a slice of the channels by a computed bound ({node.name})")
                    return
                self._equal_parts(x, n)
                b = len(x) // n
            elif not (b is None or isinstance(b, int)):
                self._opaque(node, f"a slice of the channels by {b!r}")
                return
            elif b is not None:
                self._block(x[:b] if b >= 0 else x[b:], f"a slice of the channels at a constant bound ({node.name})")
            bounds.append(b)
        self.atoms[node.name], self.live[node.name] = x[slice(*bounds)], live[slice(*bounds)]

    def _getitem(self, node) -> None:
        """Indexing that keeps the channels' dim whole (``x[:, :, ::2]``, a transformer's class token
        ``x[:, 0]``: the channels' dim moves left by the ints before it), or takes a range of the channels
        (``x[:, a:b]``)."""
        src = node.args[0]
        ndim, held = len(self._shape(src)), self._channel_dim(src)
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if index.count(Ellipsis) == 1:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1 :]
        index = index + (slice(None),) * (ndim - len(index))
        whole = slice(None)
        if len(index) != ndim or not all(isinstance(i, int | slice) and not isinstance(i, bool) for i in index):
            self._opaque(node, "indexing by tensors or new dims")
        elif index[held] == whole:
            self.atoms[node.name] = self._of(src)
            self.cdim[node.name] = held - sum(isinstance(i, int) for i in index[:held])
        elif isinstance(index[held], slice) and index[held].step in (None, 1):
            if all(i == whole for d, i in enumerate(index) if d != held):
                self._range(node, src, index[held].start, index[held].stop)
            else:
                self._opaque(node, "indexing along the channels and other dims")
        else:
            self._opaque(node, "indexing along the channels")

    # ------------------------------------------------------------------ views: flatten and channel shuffle

    @staticmethod
    def _sizes(node) -> tuple:
        """The sizes a ``view`` / ``reshape`` asks for (given one by one or as one tuple)."""
        sizes = tuple(node.args[1:]) or tuple(node.kwargs.get("shape", ()))
        return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], tuple | list) else sizes

    def _reshape(self, node, shape) -> None:
        """``view`` / ``reshape``: one keeping the channels' dim whole (merging or splitting the dims before it and
        those after it among themselves: [B, C, H, W] to [B, C, HW], tokens [B, N, C] to [B, H, W, C]), a flatten to
        [B, -1], a split of the channels into a grid (a shuffle's first step), or opaque. A constant channel count
        in the sizes is a module's width attribute surgery rewrites, else the channels stay."""
        src_node = node.args[0]
        src, x, sizes = self._shape(src_node), self._of(src_node), self._sizes(node)
        held = self._channel_dim(src_node)
        if shape is None or src is None or x is None or len(sizes) != len(shape):
            self._opaque(node, f"{node.target} of a tensor without channels")
        elif held == 1 and len(shape) == 5 and len(src) == 4 and shape[1] * shape[2] == src[1] and shape[3:] == src[2:]:
            self._split_view(node, x, shape, sizes)
        elif (kept := _kept_dim(src, shape, held)) is not None:
            if isinstance(sizes[kept], int) and sizes[kept] != -1:
                self._constant_width(node, x, sizes[kept])
            self.atoms[node.name], self.cdim[node.name] = x, kept
        elif held == 1 and len(shape) == 2 and src[0] == shape[0]:
            if isinstance(sizes[1], int) and sizes[1] != -1:  # view(B, 512): fixed whatever is pruned
                self._block(x, f"a {node.target} to a constant width ({node.name})")
            self._flatten(node, x, 1, -1)
        else:
            self._opaque(node, f"{node.target} across the channels")

    def _constant_width(self, node, x: np.ndarray, width: int) -> None:
        """A view's constant channel count: the module whose code it is holds it as an int attribute (ViT's
        ``hidden_dim``), which surgery sets to the kept count; when no one attribute holds it, the channels stay."""
        stack = list(node.meta.get("nn_module_stack", {}))
        owner = stack[-1] if stack else ""
        found = _width_attribute(self.modules.get(owner), width)
        if found is None:
            self._block(x, f"a {node.target} to a constant width ({node.name})")
            return
        key = (owner, found)
        if key in self.width_attributes:  # met again (another call, the other mode): the same channels
            self._tie(self.width_attributes[key], x)
        self.width_attributes.setdefault(key, x)

    def _split_view(self, node, x, shape, sizes) -> None:
        """[B, C, H, W] viewed as [B, A, C / A, H, W]: the atoms as an A x C / A grid. The constant one of A and
        C / A keeps its size, so the other one's positions go whole: each column (A constant: channel j of every
        group, a shuffle's column) or row is one channel; both constant: unprunable."""
        a, b = (isinstance(s, int) and s != -1 for s in sizes[1:3])
        grid, live = x.reshape(shape[1], shape[2]), self.live[node.args[0].name].reshape(shape[1], shape[2])
        if a and not b:
            self._tie_rows(grid.T)
        elif b and not a:
            self._tie_rows(grid)
        else:
            self._block(x, f"a view of the channels into constant sizes ({node.name})")
        self.grids[node.name] = (grid, live)

    def _grid(self, node, shape) -> None:
        """An operation on a channel grid: passed through, transposed (a shuffle), merged back, or opaque."""
        grid, live = self.grids[node.args[0].name]
        name, src = node.target, self._shape(node.args[0])
        if node.op == "call_module":  # a module on the grid: an activation passes it through
            passing = isinstance(self.modules[name], ACTIVATION_MODULES + (nn.Identity,))
            name = "contiguous" if passing else f"module {name}"
        dims = [d % 5 for d in self._sizes(node)] if name in ("permute", torch.permute) else None
        swap = (
            name in ("transpose", torch.transpose, "swapaxes", torch.swapaxes)
            and sorted(d % 5 for d in node.args[1:3]) == [1, 2]
        ) or (dims == [0, 2, 1, 3, 4])
        merge = name in ("view", "reshape", torch.reshape, "flatten", torch.flatten) and shape is not None
        merge = merge and len(shape) == 4 and shape[1] == grid.size and shape[2:] == src[3:]
        if name in PASS_METHODS or name in PASS_FUNCTIONS:
            self.grids[node.name] = (grid, live)
        elif swap:
            self.grids[node.name] = (grid.T, live.T)
        elif merge:
            width = self._sizes(node)[1] if name in ("view", "reshape", torch.reshape) else -1
            if isinstance(width, int) and width != -1:
                self._block(grid, f"a view to a constant width ({node.name})")
            self.atoms[node.name], self.live[node.name] = grid.ravel(), live.ravel()
        else:
            self._opaque(node, f"{getattr(name, '__name__', name)} of a channel grid")

    def _permute(self, node, shape) -> None:
        """``permute`` / ``transpose`` / ``swapaxes``: the atoms move with the dim that holds them (to the last:
        channels last)."""
        src, x = node.args[0], self._of(node.args[0])
        if x is None:
            self._opaque(node, f"{getattr(node.target, '__name__', node.target)} of a tensor without channels")
            return
        ndim, held = len(shape), self._channel_dim(src)
        if node.target in ("permute", torch.permute):
            order = [d % ndim for d in (self._sizes(node) or _arg(node, 1, "dims"))]
        else:
            order = list(range(ndim))
            first, second = (
                _arg(node, 1, "dim0", node.kwargs.get("axis0")),
                _arg(node, 2, "dim1", node.kwargs.get("axis1")),
            )
            i, j = first % ndim, second % ndim
            order[i], order[j] = order[j], order[i]
        self.atoms[node.name] = x
        self.cdim[node.name] = order.index(held)

    def _flatten(self, node, x, start: int, end: int) -> None:
        """``flatten``: of dims that exclude the channels' (a patch embedding's H and W into tokens), the channels
        pass, their dim moved; of the channels and every dim after them ([B, C, H, W] to [B, C x H x W]), each
        atom repeated per position; anything else is opaque."""
        src, held = self._shape(node.args[0]), self._channel_dim(node.args[0])
        start, end = (start % len(src), end % len(src)) if src is not None else (start, end)
        if x is not None and src is not None and not start <= held <= end and start > 0:
            self.atoms[node.name] = x
            self.cdim[node.name] = held if held < start else held - (end - start)
        elif x is None or src is None or held != 1 or start != 1 or end != len(src) - 1:
            self._opaque(node, "flatten of other dims than channels and space")
        else:
            self.atoms[node.name] = np.repeat(x, int(np.prod(src[2:])))  # channel-major: c * H * W + position
            self.live[node.name] = np.repeat(self.live[node.args[0].name], int(np.prod(src[2:])))
            self.cdim[node.name] = 1

    def _reduce(self, node, dims, keepdim: bool) -> None:
        """A mean over dims that are neither the batch's nor the channels' (space, tokens): the channels pass."""
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        ndim, held = len(self._shape(node.args[0])), self._channel_dim(node.args[0])
        dims = [d % ndim for d in dims]
        if dims and all(d not in (0, held) for d in dims):
            self.atoms[node.name] = self._of(node.args[0])
            self.cdim[node.name] = held if keepdim else held - sum(d < held for d in dims)
        else:
            self._opaque(node, "a mean over the channels")

    def _pad(self, node) -> None:
        """``F.pad`` of [B, C, H, W]: padding along the channels (the option-A shortcut) adds channels of zeros,
        new atoms that join the residual stream they are added to; the input's channels keep theirs (a later
        stage's channel that carries an earlier one goes only with it). A padded channel can go when the module
        doing the padding names its widths (``channel_padding = (attribute before, attribute after)``),
        which surgery then lowers; otherwise the widths are fixed and those channels are unprunable."""
        pad = _arg(node, 1, "pad")
        x = self._of(node.args[0])
        left, right = (pad[4], pad[5]) if len(pad) >= 6 else (0, 0)
        if len(pad) > 6 or x is None:
            self._opaque(node, "padding beyond the channels")
            return
        before, after = self._new(left), self._new(right)
        stack = list(node.meta.get("nn_module_stack", {}))
        owner = stack[-1] if stack else None
        if owner is not None and getattr(self.modules[owner], "channel_padding", None):
            if owner in self.pads:  # the other mode's trace: the same padded channels
                self._tie(self.pads[owner][0], before), self._tie(self.pads[owner][1], after)
            self.pads.setdefault(owner, (before, after))
        else:
            self._block(np.concatenate([before, after]), "zero-padded channels (fixed padding widths)")
        self.atoms[node.name] = np.concatenate([before, x, after])
        value = _arg(node, 3, "value", 0) or 0
        filled = np.full(left + right, bool(value))  # padded with zeros: nothing to mask; with a constant: live
        self.live[node.name] = np.concatenate([filled[:left], self.live[node.args[0].name], filled[left:]])

    def _param(self, module: str, param: str, dims: dict[int, np.ndarray | None]) -> None:
        key = (module, param)
        known = self.dims.setdefault(key, {})
        for d, atoms in dims.items():
            if atoms is None:
                continue
            if d in known:  # a layer called twice (or in both modes' traces): the same channels every time
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

    def kept_shape(self, module: str, param: str, removed: set[int]) -> tuple[int, ...]:
        """The shape ``module.param`` has once the ``removed`` channels are gone."""
        dims, shape = self.dims.get((module, param), {}), self.model.get_parameter(f"{module}.{param}").shape
        gone = np.fromiter(removed, np.int64, len(removed))
        return tuple(int(self._kept(dims[d], gone).sum()) if d in dims else n for d, n in enumerate(shape))

    def count(self, removed: set[int]) -> tuple[int, int]:
        """(params, MACs per image) after removing the ``removed`` channels: parameter elements from the kept sizes of
        every indexed dim, MACs = conv / linear weight elements x output pixels of the eval-mode forward (a layer run
        only in training mode adds none). Computed, not measured."""
        params = macs = 0
        removed = np.fromiter(removed, np.int64, len(removed))
        for name, p in self.model.named_parameters():
            module, _, pname = name.rpartition(".")
            dims = self.dims.get((module, pname), {})
            n = 1
            for d, size in enumerate(p.shape):
                n *= int(self._kept(dims[d], removed).sum()) if d in dims else size
            params += n
            macs += n * self.pixels.get((module, pname), 0)
        for rows, tokens in self.matmuls:  # attention's QK^T and AV: tokens x tokens x (q's + v's kept rows)
            macs += 2 * tokens * int(self._kept(rows, removed).sum())
        return params, macs

    def pruned(self, removed: set[int]) -> nn.Module:
        """A copy of the model without the ``removed`` channels (every layer sliced; depthwise groups, GroupNorm
        groups and padding widths follow); its state dict keeps the modules' versions."""
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
            for module, atoms in self.norm_groups.items():
                m, kept = modules[module], int(self._kept(atoms, removed).sum())
                size = m.num_channels // m.num_groups  # every group keeps its size: whole groups went
                m.num_channels, m.num_groups = kept, kept // size
            for (module, attribute), atoms in self.width_attributes.items():
                setattr(modules[module], attribute, int(self._kept(atoms, removed).sum()))
            for module, (units, heads, width, scale) in self.attentions.items():
                kept = int(self._kept(units, removed).sum())
                shape = {"heads": (kept, width), "head_width": (heads, kept), "none": (heads, width)}[self.attention]
                attn.resize(model, module, *shape, (heads, width, scale))
        return model

    def masked(self, removed: set[int]) -> nn.Module:
        """The unmodified network, traced, with every tensor multiplied by 0 at the removed channels' atoms and
        every layer norm over the channels normalising over the kept ones; one trace per mode where the modes trace
        differently (a module running the one of its mode)."""
        removed = np.fromiter(removed, np.int64, len(removed))
        root = copy.deepcopy(self.model)
        with torch.no_grad():  # inside an attention layer: its removed units' q, k and v rows are zero
            for (module, param), rows in self.inner.items():
                t = root.get_submodule(module).get_parameter(param)
                t[~self._kept(rows, removed).to(t.device)] = 0
        masked = {t.training: self._masked(root, t, removed) for t in self.traces}
        return masked[False] if len(masked) == 1 else _BothModes(masked[False], masked[True])

    def _masked(self, root: nn.Module, trace: _Trace, removed: np.ndarray) -> fx.GraphModule:
        """One trace on ``root``'s modules with the removed channels' atoms (along the dim holding them) times 0."""
        out = fx.GraphModule(root, copy.deepcopy(trace.gm.graph))
        shapes = {node.name: self._shape(node) for node in trace.gm.graph.nodes}
        device = next(iter(root.buffers()), next(iter(root.parameters()), torch.zeros(0))).device
        for node in list(out.graph.nodes):
            a = trace.atoms.get(node.name)
            if a is None or node.op in (INPUT, "output"):
                continue
            keep = self._kept(a, removed)
            if bool(keep.all()):
                continue
            name = f"_mask_{node.name}"
            out.register_buffer(name, keep.float().to(device))
            with out.graph.inserting_after(node):
                getter = out.graph.get_attr(name)
            sizes = [1] * len(shapes[node.name])
            sizes[trace.cdim.get(node.name, 1)] = -1
            with out.graph.inserting_after(getter):
                mask = out.graph.call_method("reshape", (getter, sizes))
            result = node
            if node.name in trace.layer_norms:
                with out.graph.inserting_after(mask):
                    result = out.graph.call_function(kept_layer_norm, (*_layer_norm_args(out, node), getter))
                node.replace_all_uses_with(result, delete_user_cb=lambda user, r=result: user is not r)
            with out.graph.inserting_after(mask if result is node else result):
                product = out.graph.call_function(operator.mul, (result, mask))
            result.replace_all_uses_with(product, delete_user_cb=lambda user, p=product: user is not p)
        out.graph.lint()
        out.recompile()
        return out


def _layer_norm_args(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """(input, weight, bias, eps) of a layer norm node, a module's call or ``F.layer_norm``'s."""
    if node.op == "call_function":
        return tuple(
            _arg(node, i, name, default)
            for i, name, default in ((0, "input", None), (2, "weight", None), (3, "bias", None), (4, "eps", 1e-5))
        )
    m = gm.get_submodule(node.target)
    with gm.graph.inserting_before(node):
        weight, bias = (
            gm.graph.get_attr(f"{node.target}.{p}") if getattr(m, p, None) is not None else None
            for p in ("weight", "bias")
        )
    return node.args[0], weight, bias, m.eps


def kept_layer_norm(x, weight, bias, eps: float, keep):
    """A layer norm over the last dim's kept channels alone (``keep``: 1 or 0 per channel), as the network pruned
    of the others computes it; the removed channels' outputs are 0."""
    n = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / n
    var = ((x - mean) * keep).pow(2).sum(-1, keepdim=True) / n
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * keep


def _kept_dim(src: tuple[int, ...], shape: tuple[int, ...], held: int) -> int | None:
    """The dim of a view's ``shape`` holding the channels (dim ``held`` of ``src``) whole: the same size, every dim
    before it merged or split among themselves (so the dims after it too); None if the channels are merged or split."""
    before = int(np.prod(src[:held]))
    for e, size in enumerate(shape):
        if size == src[held] and int(np.prod(shape[:e])) == before:
            return e
    return None


WIDTH_WORDS = ("dim", "channel", "width", "feature", "embed", "hidden")


def _width_attribute(m: nn.Module | None, width: int) -> str | None:
    """The one int attribute of ``m`` equal to ``width`` (of several, the one whose name says it is a width)."""
    if m is None:
        return None
    names = [k for k, v in vars(m).items() if type(v) is int and v == width and not k.startswith("_")]
    if len(names) > 1:
        names = [k for k in names if any(word in k.lower() for word in WIDTH_WORDS)]
    return names[0] if len(names) == 1 else None


def _resize(m: nn.Module) -> None:
    """A sliced layer's size attributes follow its tensors (a GroupNorm's: ``ChannelGraph.pruned``)."""
    if isinstance(m, nn.Conv2d):
        if m.groups > 1:  # whole groups went (depthwise: one channel each); every group keeps its size
            m.groups = m.weight.shape[0] // (m.out_channels // m.groups)
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        m.num_features = m.running_mean.shape[0] if m.running_mean is not None else m.weight.shape[0]
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = tuple(m.weight.shape)
