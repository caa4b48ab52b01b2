"""Shared test setup: one torch thread (small models run faster so, and tests share the machine), the fixtures
every test module uses (composing configs in-process, running the installed command, the doc pages), the slow
tests run first, and a note at the end of a session naming the tests not marked slow that took long."""

import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY, compose_config, run_cli
from prune_cli.cli.run import main
from prune_cli.run import pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def compose():
    return compose_config


@pytest.fixture(scope="session")
def tiny(compose):
    """Compose a tiny synthetic run with 2 pretrain and 1 finetune epochs, plus overrides."""
    return lambda *overrides: compose(*TINY, "schedule.pretrain.epochs=2", "schedule.finetune.epochs=1", *overrides)


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory):
    """One finished ``tiny()`` run (pretrain, prune, finetune) a session's tests share: its config object, directory
    and rows. Tests only read it; one that writes into a run works on a copy of the directory."""
    cfg, run_dir = tiny(), tmp_path_factory.mktemp("tiny_run")
    return cfg, run_dir, pipeline.run(cfg, run_dir)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture
def command(monkeypatch, capsys):
    """``prune-cli ARGS`` through its entry point in this process: its exit code, stdout and stderr, as ``cli`` gives
    them from a new interpreter, seconds sooner. What only a process shows (a sweep, signals, torchrun) uses ``cli``."""

    def run(*args, env=None):
        for key, value in {"HYDRA_FULL_ERROR": "0", **(env or {})}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["prune-cli", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["prune-cli", *args], code, out, err)

    return run


@pytest.fixture(scope="session")
def readme():
    return (ROOT / "README.md").read_text()


@pytest.fixture(scope="session")
def options_page():
    return (ROOT / "docs" / "options.md").read_text()


# modules of the longest tests (whole runs of 10-25 s: golden presets, torchrun, launcher and Optuna sweeps): they
# start first, so that no long test is left to run alone at the end
LONGEST_FIRST = ("test_presets.py", "test_distributed.py", "test_launchers.py", "test_search.py")


def pytest_collection_modifyitems(items):
    """The slow tests first (the modules of the longest ones ahead), each kind in its own order: the two workers then
    end together, instead of one running the last long test alone while the other waits."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.path.name not in LONGEST_FIRST))


UNMARKED_LIMIT_S = 5.0  # a test not marked slow should take a fraction of this; past it, the session names it
_unmarked_slow: list[tuple[float, str]] = []


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > UNMARKED_LIMIT_S and "slow" not in report.keywords:
        _unmarked_slow.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter):
    if _unmarked_slow:
        terminalreporter.section(f"tests over {UNMARKED_LIMIT_S:g} s not marked slow (mark them or make them cheaper)")
        for seconds, nodeid in sorted(_unmarked_slow, reverse=True):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
