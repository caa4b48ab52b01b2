"""Every paper preset runs end to end as a smoke test (debug=smoke) on small files in the real data formats,
and gives exactly the results table captured before the architecture changed (tests/golden/, timing aside)."""

import pytest

from helpers import GOLDEN_DIR, make_preset_data, results_table, smoke_overrides
from helpers import compose_config as config
from prune_cli.cli.run import CONF_DIR
from prune_cli.run import pipeline

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_preset_data(tmp_path_factory.mktemp("data"))


def test_there_are_presets_for_every_paper():
    for prefix in [
        "hgsr_",
        "slimming_",
        "polarization_",
        "l1norm_",
        "fpgm_",
        "hrank_",
        "pfs_",
        "grafting_",
        "swp_",
        "rmnet_",
        "cg_",
        "scop_",
        "grda_",
        "merging_",
        "pfp_",
    ]:
        assert any(p.startswith(prefix) for p in PRESETS), prefix


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_smoke(preset, data_root, tmp_path):
    cfg = config(*smoke_overrides(preset, data_root))
    rows = pipeline.run(cfg, tmp_path)
    stages = [r["stage"] for r in rows]
    assert stages == ["init", *cfg.schedule.stages]
    assert all(r["epochs"] <= 1 for r in rows)  # smoke: one epoch per stage
    if {"prune", "gates"} & set(stages):
        assert rows[-1]["params"] < rows[0]["params"]
    assert results_table(tmp_path) == (GOLDEN_DIR / f"{preset}.csv").read_text()


def test_digits_demo_equals_its_golden_table(tmp_path):
    """The plain ``prune-cli`` demo (digits, ResNet-20, 30 + 15 epochs) reproduces its captured table (timing
    columns aside: the demo's latency is left off here, test_latency.py measures it)."""
    pipeline.run(config("trainer.progress=false", "latency=off"), tmp_path)
    assert results_table(tmp_path) == (GOLDEN_DIR / "digits_demo.csv").read_text()
