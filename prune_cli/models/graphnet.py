"""Networks prune_cli did not write: ``model=torchvision`` (``model.network=resnet18``) and ``model=custom``
(``model.target=package.module:factory``, ``model.kwargs={...}``), pruned through their traced channel graph.

Simple groups (``graph.py``) have one shape: a conv (groups 1), the BatchNorm right after it if there is one (none:
the conv's output is where the mask applies), and the layers that read exactly those channels. With ``shared``
(``prune.residual``: ``auto`` for these networks, or ``true``) also those several layers hold (residual streams,
depthwise chains, concatenated or flattened channels), as slots with positions; ``prune.residual=true`` wraps any
network so, a built-in one too (``traced``: its own arch as the factory).
A pruned network is stored as its factory and the kept channels of every group, relative to the unpruned factory
network: ``build_model(arch)`` builds the factory network and removes the other channels again (nothing pickled).
"""

from __future__ import annotations

import importlib
import inspect
import operator
import os
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.core.errors import UserError, one_line
from prune_cli.core.options import Float, Map, Str
from prune_cli.core.trust import how_to_allow, trusted
from prune_cli.models.base import MODELS, Prunable, build_model
from prune_cli.structure.attention import PARTS, form, ours, per_head
from prune_cli.structure.graph import ELEMENTWISE, ELEMENTWISE_METHODS, ChannelGraph
from prune_cli.structure.groups import ChannelGroup, Slot

PREFIX = "net."  # the factory network is held as ``self.net``
TRACED = "traced"  # a network of another family with all its graph's groups (prune.residual=true)
LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)  # what the slots' roles know


AUX_WEIGHT = Float(
    "aux_weight",
    None,
    "training loss weight of each auxiliary head's cross-entropy (null: 0.4 for Inception v3, else 0.3, as "
    "torchvision's recipes)",
    lo=0.0,
    nullable=True,
    absent=None,
)
RECIPE_AUX_WEIGHTS = {"inception_v3": 0.4}  # GoogLeNet's paper and recipe: 0.3, the default

_imported: dict[str, object] = {}  # target -> factory, once the user allowed it in this process


def _import_target(target: str):
    """The factory ``package.module:factory`` names, if the user allowed it (``core.trust``) now or earlier in this
    process (a network already built from it is rebuilt by surgery). A module in the folder the command started
    from is found too, after every installed one (so a file there never shadows a package)."""
    if target in _imported:
        return _imported[target]
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise UserError("model.target", f"{target!r} is not package.module:factory")
    if not trusted(target):
        raise UserError("model.target", how_to_allow(target))
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise UserError("model.target", f"cannot import {target} ({type(e).__name__}: {e})") from None
    except SystemExit as e:
        raise UserError("model.target", f"importing {module_name} called sys.exit({e.code!r})") from None
    _imported[target] = factory
    return factory


def _factory(arch: dict):
    """The callable that makes the unpruned network, and its keyword arguments."""
    kwargs = dict(arch.get("kwargs") or {})
    if arch["name"] == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if arch["network"] not in names:
            raise UserError("model.network", f"{arch['network']!r} is not a torchvision classification network")
        if arch["in_channels"] != 3:
            raise UserError(
                "model.network", f"torchvision networks read 3-channel images; the data has {arch['in_channels']}"
            )
        return torchvision.models.get_model, {
            "name": arch["network"],
            "weights": None,
            "num_classes": arch["num_classes"],
            **kwargs,
        }
    factory = _import_target(str(arch["target"]))
    accepted = inspect.signature(factory).parameters
    for key in ("num_classes", "in_channels"):
        if key in accepted:
            kwargs.setdefault(key, arch[key])
    return factory, kwargs


def load_weights(net: nn.Module, path: str, num_classes: int) -> None:
    """Load a state_dict file (read as data alone) into the unpruned network ``net``. A file of the same
    architecture with another number of classes (ImageNet weights for a 10-class dataset) loads all but the
    classifier, whose outputs are the classes: it keeps its random init, and a note on stderr says so. Anything
    else that does not fit is one line naming the option."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError("model.weights_path", f"cannot read {path} ({one_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("model.weights_path", f"{path} is not a state_dict (a dict of tensors)")
    own = net.state_dict()
    head = {
        k
        for k, v in state.items()
        if k in own and v.shape != own[k].shape and own[k].shape[:1] == (num_classes,) and v.dim() == own[k].dim()
    }
    for k in head:  # in place: the file's module versions (``_metadata``) stay with it
        state[k] = own[k]
    try:
        net.load_state_dict(state)
    except Exception as e:
        raise UserError("model.weights_path", f"does not fit the network ({one_line(e)})") from None
    if head:
        print(
            f"note: model.weights_path: {', '.join(sorted(head))} hold another number of classes than "
            f"{num_classes}: the classifier starts from random init",
            file=sys.stderr,
        )


def graph_groups(graph, shared: bool = False) -> list[tuple[ChannelGroup, list[int]]]:
    """The graph's groups the pipeline can prune, as channel groups (module names as in ``graph.model``) with
    their channel ids, in order.

    Always those of one conv (groups 1) with its BatchNorm, if any, and layers reading exactly those channels, in
    order (no other layer touches them). With ``shared``, also the groups several layers produce or hold at other
    positions (residual streams, depthwise chains, concatenations), and those on channels-last tensors (a linear
    layer on [B, H, W, C] as a producer, a LayerNorm over the channels, a layer scale: ConvNeXt's). Every producer
    is a conv or such a linear layer; every norm an affine BatchNorm2d or a LayerNorm with a weight, on feature
    maps; a group without one is masked at its producers' output (rows and biases zeroed). Either way only
    channels no layer reads nonzero when their producers' rows and norms' entries are zeroed (the graph's
    ``unsafe``), so that the stages' mask is removing them (up to a LayerNorm's statistics: ``mask_channels``)."""
    out: list[tuple[ChannelGroup, list[int]]] = []
    unsafe = {int(graph.root[a]) for a in graph.unsafe}
    heads = _per_head(graph)  # sliced with their heads, never masked
    layers = _layers(graph, heads)
    keys = list(layers)
    holding: dict[int, set[int]] = {}  # channel -> the layers (indexes into keys) holding it
    for k, roots in enumerate(layers.values()):
        for r in np.unique(roots).tolist():
            holding.setdefault(r, set()).add(k)
    names: set[str] = set()
    layouts, scales = _layouts(graph), {**dict.fromkeys(heads, False), **_scales(graph)}
    for group in graph.groups:
        order = group.channels
        if unsafe.intersection(order):  # a layer would read it nonzero though masked: masking is not removing it
            continue
        touching = sorted(set().union(*(holding.get(c, ()) for c in order)))
        slots = [_slot(graph, *keys[k], layers[keys[k]], order, layouts, scales) for k in touching]
        if None in slots:
            continue
        producers = [s for s in slots if s.role == "producer"]
        norms = [s for s in slots if s.role == "norm"]
        consumers = tuple(s.module for s in slots if s.role == "consumer")
        # what the activation criteria read; the mask zeroes the norms' entries (none: the producers' output)
        if not producers or not all(_on_feature_maps(graph.modules[s.module], s, layouts) for s in producers + norms):
            continue
        plain = all(s.out_dim == 1 and s.role != "param" for s in slots)  # a conv's channels, as the families'
        simple = (
            len(producers) == 1
            and len(norms) <= 1
            and all(s.positions is None for s in slots)
            and getattr(graph.modules[producers[0].module], "groups", 1) == 1
            and consumers
            and plain
        )
        if not (simple or shared):
            continue
        name = producers[0].module if simple else _unique(group.name, names)
        names.add(name)
        mask_point = (norms or producers)[0].module  # no BatchNorm: the conv is its own mask point (as plain nets)
        channel_group = ChannelGroup(name, producers[0].module, mask_point, consumers)
        out.append((channel_group if simple else replace(channel_group, shared=tuple(slots)), order))
    return out


STANDARD_PARAMS = ("weight", "bias", "running_mean", "running_var")  # a layer's own tensors, one slot per dim


def _per_head(graph) -> set[tuple[str, str]]:
    """(module, parameter) of the attention layers' per-head tensors (relative position tables, Swin v2's logit
    scale and position bias MLP's outputs): sliced and counted with their heads, never masked (a head's zeroed
    q, k and v rows make its output 0 whatever its bias)."""
    found = set()
    for name in graph.attentions:
        for module, param, _ in per_head(graph.modules[name]):
            found.add((f"{name}.{module}" if module else name, param))
    return found


def _layers(graph, per_head_tensors: set[tuple[str, str]]) -> dict[tuple[str, str, int], np.ndarray]:
    """(module, parameter, dim) -> the channel of every position, in model order: one entry per dim of a conv,
    linear or norm layer (its weight, bias and statistics share their channels: parameter ""), one per dim of
    any other parameter the graph indexes (a layer scale, an attention's per-head tensor)."""
    layers: dict[tuple[str, str, int], np.ndarray] = {}
    for (module, param), dims in graph.dims.items():
        own = isinstance(graph.modules[module], LAYERS) and param in STANDARD_PARAMS
        own = own and (module, param) not in per_head_tensors
        for d, atoms in dims.items():
            layers.setdefault((module, "" if own else param, d), graph.root[atoms])
    return layers


def _layouts(graph) -> dict[str, tuple[int, int]]:
    """{module: (dims of its output, the dim holding its channels)} in the eval-mode trace: a module's output is
    its call's node, or the last node traced inside it (a ``LayerNorm2d``'s permute back to [B, C, H, W])."""
    layouts: dict[str, tuple[int, int]] = {}
    for node in graph.gm.graph.nodes:
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        if shape is None or node.op == "get_attr":
            continue
        inside = [node.target] if node.op == "call_module" else []
        for module in inside + list(node.meta.get("nn_module_stack", {})):
            layouts[module] = (len(shape), graph.cdim.get(node.name, 1))
    for node in graph.gm.graph.nodes:  # an attention's projections, inside it: on its input's layout
        if node.op == "call_module" and node.target in graph.attentions:
            rank = len(node.args[0].meta["tensor_meta"].shape)
            weight, proj, _, _ = PARTS[form(graph.modules[node.target])]
            for layer in (weight.rpartition(".")[0], proj):
                layouts[f"{node.target}.{layer}"] = (rank, rank - 1)
    return layouts


ADDING = {operator.add, operator.iadd, operator.sub, torch.add, torch.sub, "add", "add_", "sub"}


def _scales(graph) -> dict[tuple[str, str], bool]:
    """(module, parameter) -> whether the mask zeroes it, of the parameters the network only combines elementwise
    with its tensors, read directly (or expanded into a ``cat`` of tokens), in every mode's trace: never a layer's
    weight, whose rows a mask would have to zero. One added (a position embedding, a class token) is zeroed with
    its channel, which must stay 0; one only multiplied in (a layer scale ``x * gamma``) is not: the channel it
    multiplies is 0 already, and a zeroed divisor would make 0 / 0."""
    elementwise: dict[str, bool] = {}
    added: set[str] = set()
    for trace in graph.traces:
        for node in trace.gm.graph.nodes:
            if node.op != "get_attr":
                continue
            ok, adds = True, False
            for user in node.users:
                method = user.op == "call_method"
                tokens = method and user.target == "expand" and all(u.target is torch.cat for u in user.users)
                ok = ok and (tokens or user.target in (ELEMENTWISE_METHODS if method else ELEMENTWISE))
                adds = adds or tokens or user.target in ADDING
            elementwise[node.target] = elementwise.get(node.target, True) and ok
            if adds:
                added.add(node.target)
    return {tuple(t.rpartition(".")[::2]): t in added for t, ok in elementwise.items() if ok}


def _on_feature_maps(module: nn.Module, slot: Slot, layouts: dict[str, tuple[int, int]]) -> bool:
    """Is a producer's or norm's output one the activation criteria read ([B, C, H, W], channels-last
    [B, H, W, C], a transformer's tokens [B, N, C] or windows [B, G, P, C]; a norm also features [B, C], as
    MaxViT's head normalises its last stream), and does masking zero its channels there (a norm: its weight
    zeroed)? A linear layer on features [B, F] (a classifier's hidden layer) makes no group: the families' and
    the papers' pruning leaves those whole."""
    dims = layouts.get(slot.module, (0, 1))[0]
    if isinstance(module, nn.Conv2d):
        return True
    if isinstance(module, nn.Linear):
        return dims >= 3  # traced on a tensor (a layer the trace never met has no layout)
    if isinstance(module, nn.BatchNorm2d):
        return module.affine
    return isinstance(module, nn.LayerNorm) and module.weight is not None and dims >= 2


def _slot(
    graph,
    module: str,
    param: str,
    dim: int,
    roots: np.ndarray,
    order: list[int],
    layouts: dict[str, tuple[int, int]],
    scales: dict[tuple[str, str], bool],
) -> Slot | None:
    """Where the channels ``order`` sit in ``module``'s dim ``dim`` (of its parameter ``param``; "" for a
    layer's own tensors) (its channel per position: ``roots``), or None for a layer the stages cannot handle."""
    role = _role(graph.modules[module], param, dim, (module, param) in scales)
    if role is None:
        return None
    index = np.argsort(roots, kind="stable")  # positions grouped by channel, each channel's in their order
    ranked = roots[index]
    starts, ends = np.searchsorted(ranked, order, "left"), np.searchsorted(ranked, order, "right")
    positions = tuple(tuple(index[a:b].tolist()) for a, b in zip(starts.tolist(), ends.tolist()))
    identity = len(roots) == len(order) and all(p == (i,) for i, p in enumerate(positions))
    out_dim = layouts.get(module, (0, 1))[1] if role in ("producer", "norm") else 1
    extra = {"param": param, "axis": dim, "zeroed": scales[(module, param)]} if role == "param" else {}
    return Slot(module, role, None if identity else positions, out_dim=out_dim, **extra)


def _role(module: nn.Module, param: str, dim: int, scale: bool) -> str | None:
    """What a layer is to the channels in its dim ``dim`` (None: a layer the stages cannot handle); ``param``: a
    parameter other than a layer's own tensors, ``scale``: one only multiplied into or added to a tensor."""
    if param:
        return "param" if scale else None
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        return "norm"
    if isinstance(module, nn.LayerNorm):
        return "norm" if dim == 0 else None
    if isinstance(module, nn.Conv2d | nn.Linear):
        return "producer" if dim == 0 else "consumer"
    return None


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name#2``, ``name#3``, ... if taken (two groups produced first by one layer)."""
    k, candidate = 1, name
    while candidate in taken:
        k += 1
        candidate = f"{name}#{k}"
    return candidate


def _prefixed(group: ChannelGroup, prefix: str) -> ChannelGroup:
    """The group with its modules named in the wrapper (the factory network itself, "": the prefix's module)."""

    def name(module: str) -> str:
        return prefix + module if module else prefix.rstrip(".")

    return ChannelGroup(
        group.name,
        name(group.conv),
        name(group.bn),
        tuple(name(c) for c in group.consumers),
        tuple(replace(s, module=name(s.module)) for s in group.shared),
    )


def _attends(model: GraphNet) -> bool:
    """Does the network hold an attention layer the graph prunes by units?"""
    return any(form(m) is not None for m in model.modules())


class GraphNet(Prunable):
    """A factory network wrapped for the pipeline; its channel groups come from its traced graph."""

    needs_image_size = True  # the trace needs the data's image size (Context.arch adds it)

    @classmethod
    def options_for(cls, name: str):
        if name == TRACED:
            return ()  # made by prune.residual=true from another network's arch, never configured
        weights = Str(
            "weights_path",
            None,
            "a local state_dict file for the unpruned network (nothing is downloaded)",
            nullable=True,
        )
        if name == "torchvision":
            return (
                Str("network", "resnet18", "a torchvision classification network (random init, model.num_classes)"),
                Map("kwargs", {}, "more keyword arguments of the network's builder"),
                weights,
                AUX_WEIGHT,
            )
        return (
            Str("target", "", "package.module:factory, importable from where prune-cli starts"),
            Map(
                "kwargs", {}, "keyword arguments of the factory (num_classes / in_channels are passed if it takes them)"
            ),
            weights,
            AUX_WEIGHT,
        )

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        image_size: int = 32,
        kept: dict | None = None,
        shared: bool = False,
        network: str = "resnet18",
        target: str = "",
        kwargs: dict | None = None,
        weights_path: str | None = None,
        aux_weight: float | None = None,
        base: dict | None = None,
        attention: str = "heads",
        **ignored,  # options of the built-in families a caller may pass to every model (width_mult 1.0)
    ):
        super().__init__()
        if ignored.get("width_mult", 1.0) != 1.0:
            raise UserError("model.width_mult", f"{name} networks have no width multiplier")
        if name == TRACED:
            if not base:
                raise UserError("model.name", "traced is what prune.residual=true makes of a network; name the network")
            options = {"base": base}
        else:
            options = {"network": network} if name == "torchvision" else {"target": target}
            options.update(kwargs=dict(kwargs or {}), weights_path=weights_path, aux_weight=aux_weight)
        self.arch = dict(
            name=name,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            shared=bool(shared),
            attention=attention,
            **options,
        )
        net = self._factory_network()
        if kept is None and options.get("weights_path"):
            load_weights(net, options["weights_path"], num_classes)
        self._take(self._graph(net), kept or {})

    @classmethod
    def around(cls, model: Prunable, input_shape: tuple[int, int, int], attention: str = "heads") -> GraphNet:
        """``model`` (not copied) offering every group of its graph the stages can prune, those several layers
        share included (``prune.residual=true``), its attention layers' units by ``attention`` (``prune.attention``):
        a network of another family is wrapped as it is (``traced``: rebuilt as that network, then the graph's
        surgery)."""
        if isinstance(model, GraphNet):
            before = model.arch.get("attention", "heads")
            if model.arch["kept"] and before != attention and _attends(model):
                raise UserError(
                    "prune.attention", f"this network was pruned with prune.attention={before}: it prunes again so"
                )
            if model.arch["shared"] and before == attention:
                return model
        wrapper = cls.__new__(cls)
        Prunable.__init__(wrapper)
        if isinstance(model, GraphNet):  # the same network, its shared groups offered too
            wrapper.arch = {**model.arch, "shared": True, "attention": attention}
            full = model.net if not model.arch["kept"] else wrapper._factory_network()
            wrapper._take(wrapper._graph(full), model.arch["kept"], net=model.net)
        else:
            c, size = input_shape[0], input_shape[1]
            base = model.arch
            wrapper.arch = dict(name=TRACED, num_classes=base["num_classes"], in_channels=c, image_size=size)
            wrapper.arch.update(shared=True, base=base, attention=attention)
            wrapper._take(wrapper._graph(model), {})
        return wrapper.train(model.training)  # the wrapper's mode is its network's

    def _factory_network(self) -> nn.Module:
        """The unpruned network of ``arch``."""
        if self.arch["name"] == TRACED:
            return build_model(self.arch["base"])
        factory, kwargs = _factory(self.arch)
        try:
            return factory(**kwargs)
        except SystemExit as e:  # the user's code ending the process would end the run with no record
            raise UserError("model.target", f"the factory called sys.exit({e.code!r})") from None

    def _graph(self, net: nn.Module):
        """The channel graph of ``net``, whose attention layers become ours first (in place: their projections are
        the ``Linear`` modules the stages read and mask)."""
        size = self.arch["image_size"]
        example = torch.zeros(2, self.arch["in_channels"], size, size)
        return ChannelGraph(ours(net), example, self.arch.get("attention", "heads"))

    def _take(self, full, kept: dict, net: nn.Module | None = None) -> None:
        """Hold the network of the ``full`` graph without the channels ``kept`` leaves out (``net``: that network,
        already made), and its groups."""
        shared = self.arch["shared"]
        offered = graph_groups(full, shared)
        self.full_widths = {g.name: len(order) for g, order in offered}
        if kept and net is None:  # remove again what the stored network had removed
            removed = set()
            for group, order in offered:
                keep = set(kept.get(group.name, range(len(order))))
                removed |= {c for i, c in enumerate(order) if i not in keep}
            net = full.pruned(removed)
        self.arch["kept"] = {k: list(v) for k, v in kept.items()}
        self.net = net if net is not None else full.model
        graph = self._graph(self.net) if kept else full
        self.activations = set(graph.activations)  # what a method that needs ReLU checks (neuron merging)
        groups = [g for g, _ in graph_groups(graph, shared)]
        self._groups = [_prefixed(g, PREFIX) for g in groups]
        layouts = _layouts(graph)
        self._last = {  # those the classifier reads: a linear layer on features, not one on channels-last maps
            i
            for i, g in enumerate(groups)
            if any(isinstance(graph.modules[c], nn.Linear) and layouts.get(c, (2, 1))[0] != 4 for c in g.consumers)
        }

    def forward(self, x):
        """The network's logits; of a tuple or named tuple of logits (GoogLeNet's and Inception's training-mode
        outputs), the first, the others kept for :meth:`aux_loss`."""
        out = self.net(x)
        if isinstance(out, torch.Tensor):
            return out
        main, *heads = out
        if self.training:
            self._aux = [h for h in heads if isinstance(h, torch.Tensor)]  # a head switched off is None
        return main

    def aux_loss(self, y: torch.Tensor) -> torch.Tensor | None:
        """``model.aux_weight`` x the auxiliary heads' cross-entropy of the last training forward."""
        heads, self._aux = getattr(self, "_aux", []), []
        if not heads:
            return None
        weight = self.arch.get("aux_weight")
        if weight is None:
            weight = RECIPE_AUX_WEIGHTS.get(self.arch.get("network"), 0.3)
        return weight * sum(F.cross_entropy(h, y) for h in heads)

    def channel_groups(self) -> list[ChannelGroup]:
        return list(self._groups)

    def last_groups(self) -> set[int]:
        return set(self._last)

    def segments(self):
        """A wrapped prune_cli network's own segments (the loss greedy re-runs a candidate from its segment)."""
        if not isinstance(self.net, Prunable):
            return super().segments()
        return [(PREFIX + prefix if prefix else "", fn) for prefix, fn in self.net.segments()]

    def shortcut_convs(self) -> list[str]:
        base = self.net.shortcut_convs() if isinstance(self.net, Prunable) else []
        return [PREFIX + name for name in base]

    @property
    def widths(self) -> list[int]:
        modules = dict(self.named_modules())
        return [g.width(modules) for g in self._groups]

    def pruned_arch(self, index: list) -> dict:
        kept = dict(self.arch["kept"])
        for group, positions in zip(self._groups, index):
            current = kept.get(group.name, list(range(self.full_widths[group.name])))
            kept[group.name] = [current[i] for i in positions.tolist()]
        return {**self.arch, "kept": kept}


MODELS.register("torchvision", "custom", TRACED)(GraphNet)
