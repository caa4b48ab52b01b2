"""The config checker against the declarations: every option of every part refuses a wrong type or range
with its full path, composed configs hold exactly the declared options, YAML defaults equal the declared
ones, docs/options.md's tables are the generated ones, and the loss criterion fails before training."""

import copy
import functools
import json
import os
import re

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import compose_config
from prune_cli.cli.run import CONF_DIR
from prune_cli.core.errors import UserError
from prune_cli.core.options import walk
from prune_cli.importance.criteria import CRITERIA
from prune_cli.importance.regularizers import REGULARIZERS
from prune_cli.run import config
from prune_cli.run.config import NAMED_GROUPS, declarations_at, declared, options_reference, validate
from prune_cli.run.resumable import added_option, config_differences
from prune_cli.stages import STAGES

GROUP_CHOICES = {group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) for group in NAMED_GROUPS}
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SCHEDULES = sorted(p.stem for p in (CONF_DIR / "schedule").glob("*.yaml"))
# one composed config per group choice, schedule and preset
CONFIG_KEYS = [
    *(f"{group}={choice}" for group, choices in GROUP_CHOICES.items() for choice in choices),
    *(f"schedule={schedule}" for schedule in SCHEDULES),
    *(f"experiment={preset}" for preset in PRESETS),
]


@pytest.fixture(scope="session")
def composed(tmp_path_factory, testrun_uid):
    """The plain composed config of one override (``group=choice``), a copy each time (tests may change it).

    Composed once per session (~0.1 s each): the first test process to need a config writes it to a folder the
    xdist workers of this session share, the others read it."""
    shared = tmp_path_factory.getbasetemp().parent / f"composed-{testrun_uid}"
    shared.mkdir(exist_ok=True)

    @functools.cache
    def plain(key: str) -> str:
        path = shared / f"{key}.json"
        if path.is_file():
            return path.read_text()
        text = json.dumps(OmegaConf.to_container(compose_config(key), resolve=True))
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        partial.write_text(text)
        partial.replace(path)  # whole or absent, for the other worker
        return text

    return lambda key: json.loads(plain(key))


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_every_composed_config_holds_exactly_the_declared_options(composed, key):
    cfg = composed(key)
    for path, options in declared(cfg).items():
        block = cfg
        for part in path.split("."):
            block = block[part]
        names = {o.name for o in options}
        assert set(block) - {"name"} == names, path
        for o in options:
            if o.kind == "section":
                assert set(block[o.name]) == {f.name for f in o.fields}, (path, o.name)


def test_yaml_values_equal_the_declared_defaults():
    """A group's choice file sets every option to its declared default (interpolations aside)."""
    for group, choices in GROUP_CHOICES.items():
        for choice in choices:
            raw = yaml.safe_load((CONF_DIR / group / f"{choice}.yaml").read_text())
            for o in config.part_options(group, raw["name"]):
                if isinstance(raw[o.name], str) and "${" in raw[o.name]:
                    continue
                assert raw[o.name] == o.default, f"{group}/{choice}.yaml: {o.name}"
    for group, options in config.FIXED_GROUPS.items():
        raw = yaml.safe_load((CONF_DIR / group / "default.yaml").read_text())
        assert raw == {o.name: o.default for o in options}, group
    for stage_file in (CONF_DIR / "stage").glob("*.yaml"):
        raw = yaml.safe_load(stage_file.read_text())
        stage = STAGES.get(
            stage_file.stem if stage_file.stem in STAGES else "pretrain"
        )  # sgd.yaml: every training stage
        for full, o in walk(stage.options):
            value = raw
            for part in full.split("."):
                value = value[part]
            if not (isinstance(value, str) and "${" in value):
                assert value == o.default, f"stage/{stage_file.name}: {full}"


def bad_values(o):
    """Values the declaration must refuse: a wrong type, and a value just outside its range."""
    wrong_type = {
        "int": "abc",
        "float": "abc",
        "bool": "maybe",
        "str": 12,
        "choice": "nonsense",
        "list": "not-a-list",
        "map": "not-a-map",
        "any": 12,  # (an any option's rule refuses a number)
    }[o.kind]
    out = [wrong_type]
    if o.kind == "int" and o.lo is not None:
        out.append(int(o.lo) - 1)
    if o.kind == "float" and o.lo is not None:
        out.append(o.lo - 1.0 if not o.lo_open else o.lo)
    if o.kind in ("int", "float") and o.hi is not None:
        out.append(o.hi + 1)
    if not o.nullable:
        out.append(None)
    return out


def schedule_with(stage: str) -> str:
    """The first schedule choice that lists ``stage`` (its composed config holds the stage's block)."""
    return next(
        s for s in SCHEDULES if stage in yaml.safe_load((CONF_DIR / "schedule" / f"{s}.yaml").read_text())["stages"]
    )


def declaration_cases():
    """(base config key, full option path) of every declared option of every part."""
    cases = [("model=resnet20", "seed"), ("model=resnet20", "init_from")]
    for group, choices in GROUP_CHOICES.items():
        for choice in choices:
            name = yaml.safe_load((CONF_DIR / group / f"{choice}.yaml").read_text())["name"]
            cases += [(f"{group}={choice}", p) for p, _ in walk(config.part_options(group, name), group)]
    for group, options in config.FIXED_GROUPS.items():
        cases += [("model=resnet20", p) for p, _ in walk(options, group)]
    for name, stage in config.builtin_parts(STAGES):
        if stage.options:
            base = f"schedule={schedule_with(name)}"
            cases += [(base, p) for p, _ in walk(stage.options, f"schedule.{name}")]
    return cases


@pytest.mark.parametrize("base,path", declaration_cases(), ids=lambda v: v)
def test_every_declared_option_refuses_bad_values(composed, base, path):
    cfg = composed(base)
    options = dict(walk(config.RUN_OPTIONS))
    for prefix, declared_options in declared(cfg).items():
        options.update(dict(walk(declared_options, prefix)))
    o = options[path]
    for value in bad_values(o) if path != "init_from" else [12]:
        bad = copy.deepcopy(cfg)
        block = bad
        *parents, leaf = path.split(".")
        for part in parents:
            block = block[part]
        block[leaf] = value
        with pytest.raises(UserError) as e:
            config.check_resolved(bad)  # validate() without wrapping the plain config in OmegaConf and back
        assert e.value.option == path or e.value.option.startswith(path + "["), (path, value, str(e.value))


@pytest.mark.slow  # composes all 27 presets
def test_every_method_part_runs_in_a_preset(composed):
    """Every stage, regularizer and criterion a method module registers (prune_cli/methods) is used by a preset."""
    presets = [composed(f"experiment={preset}") for preset in PRESETS]
    used = {
        "stage": {stage for cfg in presets for stage in cfg["schedule"]["stages"]},
        "regularizer": {cfg["regularizer"]["name"] for cfg in presets},
        "criterion": {cfg["criterion"]["name"] for cfg in presets},
    }
    for kind, registry in (("stage", STAGES), ("regularizer", REGULARIZERS), ("criterion", CRITERIA)):
        for name, part in registry.items():
            if part.__module__.startswith("prune_cli.methods."):
                assert name in used[kind], f"no preset uses the {kind} {name} ({part.__module__})"


def test_unknown_key_is_refused_with_its_path(composed):
    cfg = composed("model=resnet20")
    cfg["criterion"]["granularty"] = "filter"
    with pytest.raises(UserError, match="unknown option") as e:
        validate(OmegaConf.create(cfg))
    assert e.value.option == "criterion.granularty"


def test_loss_criterion_options_fail_before_training(compose):
    cases = {
        "criterion.channels_per_round=0": "criterion.channels_per_round: a share in (0, 1] or a count >= 1 (got 0)",
        "criterion.verify=abc": "criterion.verify: must be a number > 0 or null; got 'abc'",
        "prune.ratio=null": "prune.ratio: the loss criterion selects to a target",
    }
    for override, message in cases.items():
        with pytest.raises(UserError) as e:
            validate(compose("criterion=loss", override))
        assert str(e.value).startswith(message), str(e.value)


def test_loss_criterion_error_through_the_command_before_any_data(command, tmp_path):
    # CIFAR-10 with no files: reaching the data would fail differently, so this error came first
    r = command(
        "criterion=loss",
        "criterion.channels_per_round=0",
        "dataset=cifar10",
        f"dataset.root={tmp_path}/none",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: criterion.channels_per_round: a share in (0, 1] or a count >= 1 (got 0)"
    ]
    assert not (tmp_path / "run" / "results.csv").exists()


def test_options_page_tables_are_the_generated_ones(options_page):
    found = re.search(r"<!-- options:begin -->\n(.*?)<!-- options:end -->", options_page, re.S)
    assert found, "docs/options.md lacks its generated option tables"
    assert found.group(1).strip() == options_reference().strip(), "regenerate: python scripts/options_tables.py"


# what a config written before each option existed meant, as the central table the declarations' absent= replaced
# held it (a stage block's option is added to every stage)
ADDED_LATER = {
    "model.prune_outputs": False,
    "model.last_maxpool": True,
    "prune.step_grid": "linear",
    "prune.residual": False,
    "schedule.pretrain.grda": {"c": 0.005, "mu": 0.51},
    "schedule.sparse_train.grda": {"c": 0.005, "mu": 0.51},
    "schedule.finetune.grda": {"c": 0.005, "mu": 0.51},
    "logger": {"name": "none"},
    "latency": "off",
    "trainer.memory_format": "auto",
    "trainer.sync_bn": False,
    "trainer.compile": False,
    "trainer.compile_backend": "inductor",
}


def test_options_added_later_say_what_older_configs_meant():
    for name, value in ADDED_LATER.items():
        assert added_option(name) == value, name
    for name in ("seed", "trainer.device", "model.width_mult", "logger.name", "schedule.pretrain.grda.c", "nonsense"):
        assert added_option(name) is None, name  # every config holds these (or none does)


def test_an_added_options_older_meaning_is_a_valid_value():
    for name, value in ADDED_LATER.items():
        for o in declarations_at(name):
            if o.kind != "section":
                assert o.check(value, name) == value, name


def test_a_config_older_than_its_options_resumes_as_the_same_run(composed):
    new = composed("model=resnet20")
    old = copy.deepcopy(new)
    for name in ("model.prune_outputs", "prune.step_grid", "prune.residual", "trainer.compile", "logger"):
        *parents, leaf = name.split(".")
        block = old
        for part in parents:
            block = block[part]
        del block[leaf]
    assert config_differences(old, new) == []
    new["prune"]["step_grid"] = "geometric"
    assert config_differences(old, new) == ["prune.step_grid"]
