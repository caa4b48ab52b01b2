"""Every ``prune-cli`` command that README.md and the pages of docs/ show composes, as ``prune-cli --cfg job``
would compose it: the code blocks cannot drift from the config groups and options they name.

A command is a line of a fenced code block (continuation lines joined) or an inline code span that starts
``prune-cli `` (also ``python -m prune_cli`` and ``torchrun ... -m prune_cli``, and after ``&&``, ``;`` or ``|``).
Shell-only parts are dropped (comments, pipes, the other commands of the line); ``NAME=value`` before the command
becomes the environment; Hydra's own flags (``--cfg job``, ``--help`` ...) are dropped; a multirun (``-m``)
composes the first value of each sweep, as its first job does. Nothing runs: ``init_from`` paths need not exist.
"""

import functools
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import OmegaConf

from helpers import ROOT
from prune_cli.cli.run import CONF_DIR

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
NAMES_PRUNE_CLI = re.compile(r"prune-cli |prune-cli$|-m prune_cli")
INLINE_COMMAND = re.compile(r"`((?:prune-cli|python -m prune_cli) [^`]*)`")
ENV_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd"}
MULTIRUN_FLAGS = {"-m", "--multirun"}


def code_lines(text: str):
    """(line number, line) of every line that names prune_cli: in shell code blocks (continuation lines joined) and
    in the inline code spans of prose."""
    fence, pending = None, None
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:] if fence is None else None
        elif fence in SHELL_FENCES:
            start, joined = pending or (number, "")
            joined += line.rstrip()
            pending = (start, joined[:-1] + " ") if joined.endswith("\\") else None
            if pending is None and NAMES_PRUNE_CLI.search(joined):
                yield start, joined
        elif fence is None:
            yield from ((number, span) for span in INLINE_COMMAND.findall(line))


def segments(line: str):
    """The shell words of each simple command of ``line`` (split at ``&&``, ``||``, ``;`` and ``|``; comments
    dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = []
    for word in lexer:
        if word and set(word) <= set("|&;"):
            yield words
            words = []
        else:
            words.append(word)
    yield words


def prune_cli_arguments(words: list[str]):
    """(environment, arguments) when ``words`` run prune_cli, else None."""
    env = {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[:1] == ["prune-cli"]:
        return env, words[1:]
    if words[:1] in (["python"], ["python3"], ["torchrun"]) and "prune_cli" in words:
        at = words.index("prune_cli")
        if words[at - 1] == "-m":
            return env, words[at + 1 :]
    return None


def commands():
    """One pytest param per prune_cli command shown in the pages, named by its page and line."""
    found = []
    for page in PAGES:
        for number, line in code_lines(page.read_text()):
            where = f"{page.relative_to(ROOT)}:{number}"
            try:
                parsed = [prune_cli_arguments(words) for words in segments(line)]
            except ValueError:  # not shell (an unclosed quote): the test says so, naming the line
                parsed = [({}, None)]
            parsed = [p for p in parsed if p is not None]
            found += [
                pytest.param(*p, line, id=where if len(parsed) == 1 else f"{where}({i})") for i, p in enumerate(parsed)
            ]
    return found


COMMANDS = commands()


def overrides_of(arguments: list[str]) -> list[str]:
    """The overrides ``prune-cli`` composes for these arguments: Hydra's flags dropped, a sweep's first job."""
    multirun = any(a in MULTIRUN_FLAGS for a in arguments)
    overrides, skip = [], False
    for argument in arguments:
        if skip or argument in MULTIRUN_FLAGS:
            skip = False
        elif argument.startswith("-"):
            skip = argument in HYDRA_FLAGS_WITH_VALUE
        else:
            overrides.append(argument)
    if not multirun:
        return overrides
    first = []
    for override in OverridesParser.create().parse_overrides(overrides):
        sweep = override.is_sweep_override()
        first.append(f"{override.get_key_element()}={first_value(override)}" if sweep else override.input_line)
    return first


def first_value(override) -> str:
    """The value of a sweep override's first job: its first choice, or an interval's (Optuna's search range) start."""
    if override.value_type == ValueType.INTERVAL_SWEEP:
        return str(override.value().start)
    return next(override.sweep_string_iterator())


@pytest.fixture(scope="module")
def hydra_conf():
    """Hydra initialised once on the package's config folder (composing is then ~50 ms a command)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def test_the_pages_show_commands():
    pages = {param.id.split(":")[0] for param in COMMANDS}
    assert "README.md" in pages, "no prune-cli command found in README.md: is the extraction broken?"
    assert len(COMMANDS) >= 30, f"only {len(COMMANDS)} prune-cli commands found in README.md and docs/"


@functools.cache
def composing_error(overrides: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> str | None:
    """Why these overrides do not compose (None when they do); pages repeat commands, so each composes once."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env:
            patch.setenv(name, value)
        try:
            cfg = compose("config", overrides=list(overrides))
            OmegaConf.to_container(cfg, resolve=True)  # what --cfg job --resolve prints: interpolations must hold
        except Exception as error:  # any failure is the documented line's
            return f"{type(error).__name__}: {error}"
    return None


@pytest.mark.parametrize("env,arguments,line", COMMANDS)
def test_documented_command_composes(hydra_conf, env, arguments, line):
    assert arguments is not None, f"this documented command is not valid shell:\n  {line}"
    error = composing_error(tuple(overrides_of(arguments)), tuple(sorted(env.items())))
    assert error is None, f"this documented command does not compose:\n  {line}\n{error}"


def test_readme_is_a_landing_page(readme):
    assert len(readme.splitlines()) <= 300, "README.md is the landing page: move reference material into docs/"
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_command_extraction_joins_continuations_and_drops_shell_parts():
    page = "```bash\nA=1 prune-cli -m x=1,2 \\\n    y=3   # note\ncd d && prune-cli --cfg job z=[a,b] | tail\n```"
    found = []
    for number, line in code_lines(page):
        found += [(number, prune_cli_arguments(words)) for words in segments(line)]
    assert [(n, args) for n, args in found if args] == [
        (2, ({"A": "1"}, ["-m", "x=1,2", "y=3"])),
        (4, ({}, ["--cfg", "job", "z=[a,b]"])),
    ]
    assert overrides_of(["-m", "x=1,2", "y=3", "z=[a,b]"]) == ["x=1", "y=3", "z=[a,b]"]
    assert overrides_of(["--cfg", "job", "z=[a,b]"]) == ["z=[a,b]"]
    assert overrides_of(["-m", "x=tag(log, interval(0.001, 0.1))", "y=interval(2, 5)"]) == ["x=0.001", "y=2.0"]
