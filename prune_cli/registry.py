"""One registry mechanism for every kind of component: parts register by name with a decorator.

A registered part carries its ``options`` (``prune_cli.options.Option`` declarations) and may define
``check_config(cfg)``, a classmethod that states rules across options (run before anything is read or
trained). The hub and the config checker look parts up by name and never name one themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import UserError


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
        if name not in self._parts:
            raise UserError(self.option_path, f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._parts[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self):
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted(self._parts)

    def items(self):
        return sorted(self._parts.items())
