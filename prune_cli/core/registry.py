"""One registry mechanism for every kind of component: parts register by name with a decorator.

A registered part carries its ``options`` (``prune_cli.core.options.Option`` declarations) and may define
``check_config(cfg)``, a classmethod that states rules across options (run before anything is read or
trained). The hub and the config checker look parts up by name and never name one themselves.

Built-in parts are discovered, not listed: the first lookup in any registry imports every module of the
built-in packages (``BUILTIN_PACKAGES``), and each module registers what it defines. A new method is a new
module in ``prune_cli/methods``; nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prune_cli.core.errors import UserError

# the packages whose modules register parts; lower layers first, so a method's module finds the parts it extends
BUILTIN_PACKAGES = (
    "prune_cli.models",
    "prune_cli.data",
    "prune_cli.importance",
    "prune_cli.engine",
    "prune_cli.stages",
    "prune_cli.methods",
)
_discovered = False


def discover_builtins() -> None:
    """Import every module of the built-in packages, once per process: importing a module registers its parts."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: a module that looks a part up while it is imported does not start a second walk
    for package in BUILTIN_PACKAGES:
        path = importlib.import_module(package).__path__
        for module in pkgutil.walk_packages(path, package + "."):
            importlib.import_module(module.name)


class Registry:
    """Parts of one kind (``model``, ``dataset``, ``criterion`` ...), keyed by the name configs use."""

    def __init__(self, kind: str, option_path: str):
        self.kind = kind
        self.option_path = option_path  # where the choice lives in the config, e.g. "criterion.name"
        self._parts: dict[str, Any] = {}

    def register(self, *names: str) -> Callable[[Any], Any]:
        """Class decorator: ``@CRITERIA.register("l1")``; a family may register several names at once."""

        def deco(part):
            for name in names:
                if name in self._parts and self._parts[name] is not part:
                    raise ValueError(f"{self.kind} {name!r} is registered twice")
                self._parts[name] = part
            if len(names) == 1 and "name" not in vars(part):  # a subclass does not inherit its parent's name
                part.name = names[0]
            return part

        return deco

    def get(self, name: str):
        discover_builtins()
        if name not in self._parts:
            raise UserError(self.option_path, f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._parts[name]

    __getitem__ = get

    def build(self, cfg, *args):
        """The part ``cfg["name"]`` names, made with ``args`` and the block's other keys as keyword options
        (``cfg``: a dict or an OmegaConf block)."""
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, dict):
            raise UserError(self.option_path.partition(".")[0], f"must be a mapping with a 'name' key, got {cfg!r}")
        options = dict(cfg)
        return self.get(options.pop("name", None))(*args, **options)

    def __contains__(self, name: object) -> bool:
        discover_builtins()
        return name in self._parts

    def __iter__(self):
        return iter(self.names())

    def names(self) -> list[str]:
        discover_builtins()
        return sorted(self._parts)

    def items(self):
        discover_builtins()
        return sorted(self._parts.items())
