"""The fx traces the channel graph reads (``graph.py``): every mode of the network, every node's output shape.

Tracing: symbolic first; a network symbolic tracing cannot follow (an ``if`` on a shape, padding computed from
the input size) is traced on the concrete example instead (every traced operation also run on the example, so
shape questions get numbers and such branches take the example's way; a branch on the data itself still cannot
be traced). The graph of such a network holds for the example's input size: the pruned network runs its own
code, so it runs at that size, and at another size only if its code takes the same way through the channels
there (the masked check, the trace itself, runs at the example's shape). Only when neither trace serves is the
network refused, naming the module.

A subclass of a torch layer that keeps the layer's forward is traced as that layer (a leaf), and so is an attention
module of a known form (``attention.py``: its heads are mapped from its tensors).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from prune_cli.core.errors import UserError
from prune_cli.structure import attention

# fx's kind of node for an argument of the traced forward (the example is the first): the op of the nodes fx's
# Graph method of that name creates
INPUT = fx.Graph.placeholder.__name__
LEAF_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


class _Tracer(fx.Tracer):
    """fx's tracer, remembering the module it was in when tracing failed (named in the error); a subclass of a
    torch layer that keeps the layer's forward is that layer (a leaf), a known attention form too."""

    def __init__(self):
        super().__init__()
        self.path: list[str] = []
        self.failed_in: str | None = None  # the innermost module being traced when tracing failed

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        same = any(isinstance(m, layer) and type(m).forward is layer.forward for layer in LEAF_LAYERS)
        return same or attention.form(m) is not None or super().is_leaf_module(m, qualified_name)

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


class _ValueProxy(fx.Proxy):
    """A proxy that also knows its value on the example: shape questions get numbers (a branch on the data
    itself still cannot be traced: the graph would hold for this example alone)."""

    @property
    def value(self):
        return self.tracer.values.get(self.node)

    def size(self, dim=None):
        return self.value.size() if dim is None else self.value.size(dim)

    def dim(self):
        return self.value.dim()

    def __len__(self):
        return len(self.value)


for _name in ("shape", "ndim", "dtype", "device"):  # the example's, where fx would record an attribute access
    setattr(_ValueProxy, _name, property(lambda self, name=_name: getattr(self.value, name)))


class _ConcreteTracer(_Tracer):
    """A tracer that runs every traced operation on the example as well (the fallback when symbolic tracing
    fails): the graph is the example's way through the network."""

    def __init__(self, example: torch.Tensor):
        super().__init__()
        self.example = example
        self.values: dict[fx.Node, object] = {}
        self.forwards: list = []  # the leaf modules' own forwards, innermost last
        self.real_attributes = False  # while running a real operation: module attributes are themselves

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.real_attributes else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        self.forwards.append(forward)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.forwards.pop()

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        args, kwargs = fx.node.map_aggregate(args, self._real), fx.node.map_aggregate(kwargs, self._real)
        self.real_attributes = True
        try:
            self.values[proxy.node] = self._run(kind, target, args, kwargs)
        finally:
            self.real_attributes = False
        return proxy

    def _real(self, a):
        """A traced value's value on the example (anything else is itself)."""
        return self.values.get(a.node) if isinstance(a, fx.Proxy) else a

    def _run(self, kind, target, args, kwargs):
        """One traced operation's value on the example."""
        if kind == INPUT:
            first = not any(n.op == INPUT for n in self.values)
            return self.example if first else (args[0] if args else None)
        if kind == "get_attr":
            value = self.root
            for part in target.split("."):
                value = getattr(value, part)
            return value
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.forwards[-1](*args, **kwargs)
        return None


def _graph(model: nn.Module, example: torch.Tensor) -> fx.Graph:
    """The model's fx graph in its present mode: traced symbolically, or on the concrete example if that fails;
    one line naming the module when neither serves."""
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as e:
        symbolic, where = e, tracer.failed_in
    concrete = _ConcreteTracer(example)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's own warnings about constants
            return concrete.trace(model)
    except Exception:
        where = where or concrete.failed_in or type(model).__name__
        why = str(symbolic).splitlines()[0] if str(symbolic) else type(symbolic).__name__
        raise UserError("model", f"{where or 'the top-level module'} cannot be traced by torch.fx ({why})") from None


def _shapes(gm: fx.GraphModule, example: torch.Tensor, training: bool) -> None:
    """Every node's output shape (one forward of ``example`` in the given mode; the random state stays)."""
    gm.train(training)
    try:
        # ShapeProp prints the failing node's traceback before raising: the user gets one line instead
        with torch.no_grad(), torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(example)
    except Exception as e:
        cause = e.__cause__ or e  # ShapeProp's own error names the node; its cause says what went wrong
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        mode = "in training mode " if training else ""
        raise UserError(
            "model", f"the network fails {mode}on an input of shape {tuple(example.shape)} ({why})"
        ) from None


def traces(model: nn.Module, example: torch.Tensor) -> list[tuple[bool, fx.GraphModule]]:
    """``[(training, graph module)]`` with every node's output shape: the eval-mode trace, then the training-mode
    one if it computes anything else (GoogLeNet's auxiliary heads). The model's modes are left as they were."""
    modes = [(m, m.training) for m in model.modules()]
    param = next(model.parameters(), None)
    if param is not None:  # the network's device and precision
        floating = param.is_floating_point() and example.is_floating_point()  # indices stay integers
        example = example.to(param.device, param.dtype if floating else example.dtype)
    out: list[tuple[bool, fx.GraphModule]] = []
    buffers = [(b, b.clone()) for b in model.buffers()]  # a training-mode forward updates BatchNorm statistics
    try:
        for training in (False, True):
            model.train(training)
            # BatchNorm needs two values per channel in training mode: a batch of one goes twice
            batch = torch.cat([example, example]) if training and example.shape[0] == 1 else example
            gm = fx.GraphModule(model, _graph(model, batch))
            if out and gm.code == out[0][1].code:
                break
            _shapes(gm, batch, training)
            out.append((training, gm))
    finally:
        for m, training in modes:  # gm shares the modules: every one's own mode back
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return out
