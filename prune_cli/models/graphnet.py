"""Networks prune_cli did not write: ``model=torchvision`` (``model.network=resnet18``) and ``model=custom``
(``model.target=package.module:factory``, ``model.kwargs={...}``), pruned through their traced channel graph.

The pipeline's stages work on channel groups of one shape: a conv (groups 1), the BatchNorm right after it, and
the layers that read exactly those channels (``ChannelGroup``). Of the graph's groups (``graph.py``) those of
that shape are offered; the others (residual streams, depthwise chains, concatenated or flattened channels)
stay whole here (``prune_cli.prune`` in Python prunes every group). A pruned network is stored as its
factory and the kept channels of every group, relative to the unpruned factory network: ``build_model(arch)``
builds the factory network and removes the other channels again, so nothing is pickled.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import torch
from torch import nn

from ..errors import UserError
from ..options import Map, Str
from .base import MODELS, ChannelGroup, Prunable

PREFIX = "net."  # the factory network is held as ``self.net``


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
    module_name, _, attribute = str(arch["target"]).partition(":")
    if not attribute:
        raise UserError("model.target", f"{arch['target']!r} is not package.module:factory")
    if os.getcwd() not in sys.path:  # a module in the folder the command was started from
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise UserError("model.target", f"cannot import {arch['target']} ({type(e).__name__}: {e})") from None
    accepted = inspect.signature(factory).parameters
    for key in ("num_classes", "in_channels"):
        if key in accepted:
            kwargs.setdefault(key, arch[key])
    return factory, kwargs


def simple_groups(graph) -> list[tuple[str, str, tuple[str, ...], list[int]]]:
    """(conv, bn, consumers, channel ids) of the graph's groups that are one conv (groups 1) with its BatchNorm
    and layers reading exactly those channels, in order (no other layer touches them), through operations that
    keep a zero a zero (so that the stages' mask, the BN output times 0, is removing the channel)."""
    out = []
    shifted = {int(graph.root[a]) for a in graph.shifted}
    indexed = [
        (module, d, graph.root[atoms].tolist()) for (module, _), dims in graph.dims.items() for d, atoms in dims.items()
    ]
    for group in graph.groups:
        order = group.channels
        if shifted.intersection(order):  # masking the BN output would not be removing the channel
            continue
        members = set(order)
        touching: dict[str, dict[int, list[int]]] = {}
        for module, d, roots in indexed:
            if not members.isdisjoint(roots):
                touching.setdefault(module, {})[d] = roots
        convs = [m for m, dims in touching.items() if 0 in dims and isinstance(graph.modules[m], nn.Conv2d)]
        bns = [m for m in touching if isinstance(graph.modules[m], nn.BatchNorm2d)]
        if len(convs) != 1 or len(bns) != 1 or graph.modules[convs[0]].groups != 1:
            continue
        conv, bn = convs[0], bns[0]
        if touching[conv].get(0) != order or touching[bn].get(0) != order:
            continue
        consumers = [m for m in touching if m not in (conv, bn)]
        ok = all(
            set(touching[m]) == {1}
            and touching[m][1] == order
            and isinstance(graph.modules[m], nn.Conv2d | nn.Linear)
            and getattr(graph.modules[m], "groups", 1) == 1
            for m in consumers
        )
        if ok and consumers:
            out.append((conv, bn, tuple(consumers), order))
    return out


class GraphNet(Prunable):
    """A factory network wrapped for the pipeline; its channel groups come from its traced graph."""

    needs_image_size = True  # the trace needs the data's image size (Context.arch adds it)

    @classmethod
    def options_for(cls, name: str):
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
            )
        return (
            Str("target", "", "package.module:factory, importable from where prune-cli starts"),
            Map(
                "kwargs", {}, "keyword arguments of the factory (num_classes / in_channels are passed if it takes them)"
            ),
            weights,
        )

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        image_size: int = 32,
        kept: dict | None = None,
        network: str = "resnet18",
        target: str = "",
        kwargs: dict | None = None,
        weights_path: str | None = None,
        **ignored,  # options of the built-in families a caller may pass to every model (width_mult 1.0)
    ):
        super().__init__()
        from ..graph import ChannelGraph

        if ignored.get("width_mult", 1.0) != 1.0:
            raise UserError("model.width_mult", f"{name} networks have no width multiplier")
        options = {"network": network} if name == "torchvision" else {"target": target}
        options.update(kwargs=dict(kwargs or {}), weights_path=weights_path)
        self.arch = dict(name=name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)
        factory, kwargs = _factory(self.arch)
        net = factory(**kwargs)
        example = torch.zeros(2, in_channels, image_size, image_size)
        if kept is None and options.get("weights_path"):
            try:
                net.load_state_dict(torch.load(options["weights_path"], map_location="cpu", weights_only=True))
            except Exception as e:
                raise UserError(
                    "model.weights_path", f"cannot load it into {name} ({type(e).__name__}: {str(e)[:200]})"
                ) from None
        full = ChannelGraph(net, example)
        self.full_widths = {conv: len(order) for conv, _, _, order in simple_groups(full)}
        if kept:  # remove again what the stored network had removed
            removed = set()
            for conv, _, _, order in simple_groups(full):
                keep = set(kept.get(conv, range(len(order))))
                removed |= {c for i, c in enumerate(order) if i not in keep}
            net = full.pruned(removed)
        self.arch["kept"] = {k: list(v) for k, v in (kept or {}).items()}
        self.net = net
        graph = ChannelGraph(net, example) if kept else full
        self.activations = set(graph.activations)  # what a method that needs ReLU checks (neuron merging)
        self._groups = [
            ChannelGroup(conv, PREFIX + conv, PREFIX + bn, tuple(PREFIX + c for c in consumers))
            for conv, bn, consumers, _ in simple_groups(graph)
        ]
        self._last = {
            i
            for i, g in enumerate(self._groups)
            if any(isinstance(self.get_submodule(c), nn.Linear) for c in g.consumers)
        }

    def forward(self, x):
        return self.net(x)

    def channel_groups(self) -> list[ChannelGroup]:
        return list(self._groups)

    def last_groups(self) -> set[int]:
        return set(self._last)

    @property
    def widths(self) -> list[int]:
        return [self.get_submodule(g.conv).out_channels for g in self._groups]

    def pruned_arch(self, index: list) -> dict:
        kept = dict(self.arch["kept"])
        for group, positions in zip(self._groups, index):
            current = kept.get(group.name, list(range(self.full_widths[group.name])))
            kept[group.name] = [current[i] for i in positions.tolist()]
        return {**self.arch, "kept": kept}


MODELS.register("torchvision", "custom")(GraphNet)
