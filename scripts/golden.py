"""Golden result tables: proof that a change leaves every run's results unchanged.

``python scripts/golden.py capture OUTDIR [NAME ...]`` runs, in this process on one torch thread (as the
test suite does), the plain digits demo (``digits_demo``: the default config, as a plain ``prune-cli`` runs it,
but contiguous: ``helpers.DEMO_OVERRIDES``) and the smoke run of every preset in ``conf/experiment`` (the
overrides and fake data of the suite's preset tests, ``helpers.smoke_overrides``), and writes each run's
``results.csv`` without its timing columns (``report.timing_column``) to
``OUTDIR/<name>.csv``. ``tests/golden/`` holds the tables captured before the registered-parts redesign (and
each later preset's first table; the identity columns since they name only the parts a schedule uses);
``tests/test_presets.py`` compares every run with them on the columns each golden table holds, cell for cell as
text, in the same rows: a column added to results.csv later needs no re-capture (its own test checks it). Re-capture
only for an intended change of results; a re-captured table holds every column of the run.

The cells are exact floats, and CPUs whose kernels round differently give other ones from the same code: the
tables of such a CPU live in ``tests/golden/<capability>/`` (``torch.backends.cpu.get_cpu_capability()``, e.g.
``AVX2``), captured with this script from code whose results hold the other tables; the tests take that folder when
the CPU they run on has one, else ``tests/golden/``. Every golden run trains contiguous (``helpers.GOLDEN_LAYOUT``),
the layout of earlier versions' CPU runs, whatever ``trainer.memory_format=auto`` means now.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the suite's shared helpers

from helpers import DEMO_OVERRIDES, compose_config, make_preset_data, results_table, smoke_overrides  # noqa: E402
from prune_cli.cli.run import CONF_DIR  # noqa: E402
from prune_cli.run import pipeline  # noqa: E402

DEMO = "digits_demo"


def capture(outdir: Path, names: list[str]) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    todo = [DEMO, *sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))]
    unknown = sorted(set(names) - set(todo))
    if unknown:
        raise SystemExit(f"unknown runs: {', '.join(unknown)}; choose from {', '.join(todo)}")
    todo = [n for n in todo if not names or n in names]
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        root = make_preset_data(Path(tmp) / "data")
        for name in todo:
            overrides = DEMO_OVERRIDES if name == DEMO else smoke_overrides(name, root)
            tic = time.perf_counter()
            pipeline.run(compose_config(*overrides), Path(tmp) / "runs" / name)
            (outdir / f"{name}.csv").write_text(results_table(Path(tmp) / "runs" / name))
            print(f"{name}: {time.perf_counter() - tic:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    cap = sub.add_parser("capture", help="run the demo and every preset's smoke run; write OUTDIR/<name>.csv")
    cap.add_argument("outdir", type=Path)
    cap.add_argument("names", nargs="*", help=f"only these runs ({DEMO} or preset names)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the test suite: results depend on the thread count
    capture(args.outdir, args.names)


if __name__ == "__main__":
    main()
