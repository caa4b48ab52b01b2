"""Options declared once: name, type, range or choices, default and a line of doc, and one checker.

Every component (model family, dataset, regularizer, criterion, stage, selection, trainer) lists its
options as ``Option`` objects. ``check_block`` validates a config block against such a list before
anything runs and names the full option path in its one-line error (``prune.ratio: must be in (0, 1);
got 1.5``). The option tables of docs/options.md are generated from the same declarations (``markdown_table``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prune_cli.core.errors import UserError


class _Always:
    """The ``absent`` of an option every config ever written holds (nothing to say about older runs)."""

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS = _Always()


@dataclass(frozen=True)
class Option:
    """One option of kind int, float, bool, str, choice, list, map, section or any.

    Numbers may carry a range, ``choice`` its choices.

    ``item`` types the entries of a ``list`` (and the values of a ``map``); ``fields`` are the options
    of a nested ``section``; ``rule`` is an extra check returning why a value is wrong (or None), and
    ``rule_doc`` how docs/options.md states it (an ``any`` option takes a value of any form: its rule alone
    checks it). ``absent`` is what a config written before the option existed
    means (how those runs behaved), so that resuming and grouping old runs compare like with like;
    ``ALWAYS`` for an option every config holds.
    """

    name: str
    kind: str
    default: Any
    doc: str
    choices: tuple = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False
    item: Option | None = None
    fields: tuple[Option, ...] = ()
    rule: Callable[[Any], str | None] | None = None
    rule_doc: str = ""
    absent: Any = ALWAYS

    def expects(self) -> str:
        """What a valid value is, in words (docs/options.md's 'type and range' column and error messages)."""
        if self.rule_doc:
            text = self.rule_doc
        elif self.kind == "choice":
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        elif self.kind in ("int", "float"):
            text = ("an integer" if self.kind == "int" else "a number") + self._range()
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a string"
        elif self.kind == "list":
            text = "a list" + (f" (each {self.item.expects()})" if self.item else "")
        elif self.kind == "map":
            text = "a mapping" + (f" to {self.item.expects()}" if self.item else "")
        else:
            text = "a block of options"
        return text + (" or null" if self.nullable else "")

    def _range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            return ""
        if lo is not None and hi is not None:
            return f" in {'(' if self.lo_open else '['}{_show(lo)}, {_show(hi)}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f" {'>' if self.lo_open else '>='} {_show(lo)}"
        return f" {'<' if self.hi_open else '<='} {_show(hi)}"

    def check(self, value: Any, path: str) -> Any:
        """The value if valid (lists and maps as plain Python objects), else UserError(path, why)."""
        if value is None:
            if self.nullable:
                return None
            raise UserError(path, f"must be {self.expects()}; got null")
        if self.kind == "section":
            return check_block(value, self.fields, path)
        if self.kind == "list":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise UserError(path, f"must be {self.expects()} (write it in brackets: [a, b]); got {value!r}")
            value = [self.item.check(v, f"{path}[{i}]") if self.item else v for i, v in enumerate(value)]
        elif self.kind == "map":
            if not isinstance(value, Mapping):
                raise UserError(path, f"must be {self.expects()}; got {value!r}")
            value = {k: self.item.check(v, f"{path}.{k}") if self.item else v for k, v in value.items()}
        elif not self._valid_scalar(value):
            raise UserError(path, f"must be {self.expects()}; got {value!r}")
        if self.rule is not None:
            why = self.rule(value)
            if why:
                raise UserError(path, why)
        return value

    def _valid_scalar(self, v: Any) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "choice":
            return any(v == c and type(v) is type(c) for c in self.choices)
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "str":
            return isinstance(v, str)
        if isinstance(v, bool) or not isinstance(v, int if self.kind == "int" else (int, float)):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- short constructors


def Int(name: str, default, doc: str, lo=None, hi=None, **kw) -> Option:  # noqa: N802 (reads as a type)
    return Option(name, "int", default, doc, lo=lo, hi=hi, **kw)


def Float(name: str, default, doc: str, lo=None, hi=None, **kw) -> Option:  # noqa: N802
    return Option(name, "float", default, doc, lo=lo, hi=hi, **kw)


def Bool(name: str, default, doc: str, **kw) -> Option:  # noqa: N802
    return Option(name, "bool", default, doc, **kw)


def Str(name: str, default, doc: str, **kw) -> Option:  # noqa: N802
    return Option(name, "str", default, doc, **kw)


def Choice(name: str, default, choices, doc: str, **kw) -> Option:  # noqa: N802
    return Option(name, "choice", default, doc, choices=tuple(choices), **kw)


def List(name: str, default, doc: str, item: Option | None = None, **kw) -> Option:  # noqa: N802
    return Option(name, "list", default, doc, item=item, **kw)


def Map(name: str, default, doc: str, item: Option | None = None, **kw) -> Option:  # noqa: N802
    return Option(name, "map", default, doc, item=item, **kw)


def Section(name: str, fields: Sequence[Option], doc: str, **kw) -> Option:  # noqa: N802
    return Option(name, "section", None, doc, fields=tuple(fields), **kw)


def Value(kind: str, **kw) -> Option:  # noqa: N802
    """An unnamed option typing the entries of a list or map."""
    return Option("", kind, None, "", **kw)


def with_default(options: Sequence[Option], **defaults) -> tuple[Option, ...]:
    """The same declarations with other defaults (a subclass or variant that only changes defaults)."""
    unknown = set(defaults) - {o.name for o in options}
    assert not unknown, f"no such options: {unknown}"
    return tuple(replace(o, default=defaults[o.name]) if o.name in defaults else o for o in options)


def defaults(options: Sequence[Option]) -> dict:
    """{name: default} of the declarations, sections as nested dicts."""
    return {o.name: defaults(o.fields) if o.kind == "section" else o.default for o in options}


# ---------------------------------------------------------------- checking a block


def check_block(block: Mapping | None, options: Sequence[Option], path: str, *, fill: bool = True) -> dict:
    """Validate ``block`` against ``options``: unknown keys and bad values raise UserError naming the full path.

    Returns the checked values as a plain dict; a missing key takes its default when ``fill`` (direct API
    use), else it is an error (a composed config always holds every declared option).
    """
    block = {} if block is None else block
    if not isinstance(block, Mapping):
        raise UserError(path, f"must be a block of options; got {block!r}")
    known = {o.name: o for o in options}
    for key in block:
        if key not in known:
            valid = ", ".join(known) or "none"
            raise UserError(_join(path, key), f"unknown option (valid here: {valid})")
    out = {}
    for name, opt in known.items():
        if name in block:
            out[name] = opt.check(block[name], _join(path, name))
        elif fill:
            out[name] = defaults(opt.fields) if opt.kind == "section" else opt.default
        else:
            raise UserError(_join(path, name), "missing (every declared option must be set)")
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def find(options: Sequence[Option], path: str) -> Option | None:
    """The declaration at the dotted ``path`` below ``options`` (a section or one of its fields), else None."""
    head, _, rest = path.partition(".")
    option = next((o for o in options if o.name == head), None)
    if option is None or not rest:
        return option
    return find(option.fields, rest) if option.kind == "section" else None


def walk(options: Sequence[Option], path: str = ""):
    """(full path, option) of every declaration, nested sections included (tests and docs walk these)."""
    for o in options:
        full = _join(path, o.name)
        if o.kind == "section":
            yield from walk(o.fields, full)
        else:
            yield full, o


def markdown_table(options: Sequence[Option], path: str) -> str:
    """The docs/options.md table of one component's options: option, type and range, default, what it does."""
    lines = ["| option | type and range | default | what it does |", "|---|---|---|---|"]
    for full, o in walk(options, path):
        default = o.default
        shown = "[]" if default == [] else "{}" if default == {} else _show(default)
        cells = [f"`{full}`", o.expects(), f"`{shown}`", o.doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
