"""Every paper preset runs end to end as a smoke test (debug=smoke) on small files in the real data formats,
and gives exactly the results table captured before the architecture changed (tests/golden/, or its folder for
the CPU's kernels: helpers.GOLDEN_DIR; timing aside): every
column a golden table holds, cell for cell as text, in the same rows (a column added since is checked by its own
test, so adding one rewrites no golden file)."""

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from helpers import DEMO_OVERRIDES, GOLDEN_DIR, ROOT, make_preset_data, results_table, smoke_overrides
from helpers import compose_config as config
from prune_cli.cli import export
from prune_cli.cli.run import CONF_DIR
from prune_cli.run import pipeline

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_preset_data(tmp_path_factory.mktemp("data"))


def test_every_paper_in_the_methods_page_has_its_presets():
    """The presets table of docs/methods.md (one row per paper setting, with its published numbers) names exactly
    the preset files."""
    page = (ROOT / "docs" / "methods.md").read_text().split("## Paper presets", 1)[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    assert documented == set(PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_smoke(preset, data_root, tmp_path):
    cfg = config(*smoke_overrides(preset, data_root))
    rows = pipeline.run(cfg, tmp_path)
    stages = [r["stage"] for r in rows]
    assert stages == ["init", *cfg.schedule.stages]
    assert all(r["epochs"] <= 1 for r in rows)  # smoke: one epoch per stage
    if {"prune", "gates"} & set(stages):
        assert rows[-1]["params"] < rows[0]["params"]
    assert_holds_golden(tmp_path, GOLDEN_DIR / f"{preset}.csv")


@pytest.mark.slow
def test_digits_demo_equals_its_golden_table(tmp_path):
    """The plain ``prune-cli`` demo (digits, ResNet-20, 30 + 15 epochs), contiguous as it trained when captured,
    reproduces its captured table (timing columns aside: the demo's latency is left off here, test_latency.py
    measures it); and its pruned model exports to INT8 (the demo's run is what that check needs: trained weights)."""
    pipeline.run(config(*DEMO_OVERRIDES), tmp_path)
    assert_holds_golden(tmp_path, GOLDEN_DIR / "digits_demo.csv")
    # its finetuned pruned model quantized to INT8: within 1 point of the fp32 model's top-1
    assert export.main([str(tmp_path), "--quantize", "int8"]) == 0
    report = json.loads((tmp_path / "model.int8.report.json").read_text())
    assert abs(report["int8"]["top1"] - report["fp32"]["top1"]) <= 1.0


def golden_differences(table: str, golden: str) -> list[str]:
    """How the results table ``table`` (csv text) differs from the ``golden`` one on the golden's columns: missing
    columns, another number of rows, and every cell whose text differs; empty when it holds the golden table."""
    new, old = (pd.read_csv(io.StringIO(t), dtype=str, keep_default_na=False) for t in (table, golden))
    missing = [c for c in old.columns if c not in new.columns]
    if missing:
        return [f"missing columns: {missing}"]
    if len(new) != len(old):
        return [f"{len(new)} rows, the golden table has {len(old)}"]
    return [
        f"row {i} ({old['stage'][i]}), {c}: {new[c][i]!r}, golden {old[c][i]!r}"
        for c in old.columns
        for i in range(len(old))
        if new[c][i] != old[c][i]
    ]


def assert_holds_golden(run_dir: Path, golden: Path) -> None:
    differences = golden_differences(results_table(run_dir), golden.read_text())
    assert not differences, f"{golden.name}: " + "; ".join(differences[:10])


def test_golden_comparison_allows_new_columns_and_nothing_else():
    golden = "stage,top1,params\ninit,10.0,270\nprune,9.5,135\n"
    assert golden_differences(golden, golden) == []
    assert golden_differences("stage,top1,params,extra\ninit,10.0,270,x\nprune,9.5,135,y\n", golden) == []
    assert golden_differences("params,stage,top1\n270,init,10.0\n135,prune,9.5\n", golden) == []  # any order
    assert golden_differences("stage,top1\ninit,10.0\nprune,9.5\n", golden) == ["missing columns: ['params']"]
    assert golden_differences("stage,top1,params\ninit,10.0,270\n", golden) == ["1 rows, the golden table has 2"]
    # text-equal: 10.00 is not 10.0 (the golden cells are exact), an empty cell is not a missing value
    assert golden_differences("stage,top1,params\ninit,10.00,270\nprune,9.5,\n", golden) == [
        "row 0 (init), top1: '10.00', golden '10.0'",
        "row 1 (prune), params: '', golden '135'",
    ]
