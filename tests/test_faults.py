"""Faults end in one line and damage nothing: a full disk (a real small tmpfs, and /dev/full under torch's own
writer) anywhere a run or an export writes, the temporary files of killed writes, a factory that calls sys.exit,
and out-of-range values the declarations refuse."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import prune_cli
from helpers import TINY, compose_config
from prune_cli.cli.run import main
from prune_cli.core import atomic
from prune_cli.core.errors import UserError
from prune_cli.core.seeds import NETWORK_STRIDE, derived, epoch_generator, numpy_rng
from prune_cli.deploy.export import export
from prune_cli.models import build_model
from prune_cli.run import lock, pipeline
from prune_cli.run.config import SEED_MAX, validate

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip() or 'mount failed'}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory, leave: int = 0):
    """Fill ``directory``'s filesystem, leaving about ``leave`` bytes free."""
    st = os.statvfs(directory)
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def temporaries(directory):
    return sorted(p.name for p in directory.rglob(f"*{atomic.TEMP_SUFFIX}"))


def test_a_full_disk_is_one_error_and_leaves_the_old_file(small_disk):
    record = small_disk / "status.json"
    record.write_text('{"status": "done"}')
    with pytest.raises(UserError) as e:
        atomic.write_bytes(record, b"x" * 2 * MiB)
    assert str(e.value) == f"{record}: no space left on device"
    assert record.read_text() == '{"status": "done"}' and temporaries(small_disk) == []


def test_torchs_writer_on_a_full_disk_is_the_same_error(small_disk):
    checkpoint = small_disk / "checkpoints" / "prune.pt"
    with pytest.raises(UserError) as e:
        atomic.save_torch(checkpoint, {"w": torch.zeros(MiB // 2)})  # 2 MiB of floats
    assert str(e.value) == f"{checkpoint}: no space left on device"
    assert not checkpoint.exists() and temporaries(small_disk) == []


def test_torchs_writer_on_dev_full(tmp_path, monkeypatch):
    """torch.save's own zip writer writing to a device whose every write fails (ENOSPC)."""
    name = tmp_path / f".prune.pt.x{atomic.TEMP_SUFFIX}"

    def full_temp_file(path):
        name.write_bytes(b"")
        return os.open("/dev/full", os.O_WRONLY), str(name)

    monkeypatch.setattr(atomic, "temp_file", full_temp_file)
    with pytest.raises(UserError) as e:
        atomic.save_torch(tmp_path / "prune.pt", {"w": torch.zeros(1000)})
    assert str(e.value) == f"{tmp_path / 'prune.pt'}: no space left on device"
    assert list(tmp_path.iterdir()) == []


def test_an_export_on_a_full_disk_is_one_error_and_leaves_no_file(small_disk):
    """torch.jit.save writing to a full disk aborted the process (exit 134); the export is made in memory."""
    model = build_model({"name": "resnet20", "num_classes": 10, "in_channels": 3})  # 1.1 MB: more than the disk
    with pytest.raises(UserError) as e:
        export(model, small_disk / "model.pt", "torchscript", (3, 8, 8))
    assert str(e.value) == f"{small_disk / 'model.pt'}: no space left on device"
    assert list(small_disk.iterdir()) == []


def test_the_lock_on_a_full_disk_is_refused_and_left_whole(small_disk):
    run_dir = small_disk / "run"
    run_dir.mkdir()
    before = json.dumps({"host": "earlier", "pid": 1})
    (run_dir / "run.lock").write_text(before)
    fill(small_disk)
    with pytest.raises(UserError) as e:
        lock.acquire(run_dir)
    assert str(e.value) == f"{run_dir}: no space left on device"
    assert (run_dir / "run.lock").read_text() == before  # not truncated
    assert not lock.owns(run_dir) and lock.lock_owner(run_dir) is None  # not held either: free for the next run
    (small_disk / "filler").unlink()
    lock.acquire(run_dir)
    assert lock.owns(run_dir)
    lock.release(run_dir)


def command(args, monkeypatch, capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of ``prune-cli ARGS`` run in this process."""
    monkeypatch.setattr(sys, "argv", ["prune-cli", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_new_run_directory_on_a_full_disk_is_one_line(small_disk, monkeypatch, capsys):
    fill(small_disk)
    code, lines = command([*TINY, f"hydra.run.dir={small_disk / 'run'}"], monkeypatch, capsys)
    assert code == 2 and lines == [f"error: {small_disk / 'run'}: no space left on device"]


def test_a_checkpoint_on_a_full_disk_fails_the_run_in_one_line(small_disk, monkeypatch, capsys):
    run_dir = small_disk / "run"
    args = [*TINY, "schedule.pretrain.epochs=1", f"hydra.run.dir={run_dir}"]  # ResNet-20's checkpoint: 1+ MB
    code, lines = command(args, monkeypatch, capsys)
    assert code == 2 and lines[-1] == f"error: {run_dir / 'checkpoints' / 'pretrain.pt'}: no space left on device"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert temporaries(run_dir) == [] and not (run_dir / "traceback.txt").exists()


def test_temporary_files_of_killed_writes_go_at_the_next_start(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    old = [tmp_path / f".results.csv.a{atomic.TEMP_SUFFIX}", checkpoints / f".prune.pt.b{atomic.TEMP_SUFFIX}"]
    for p in old:
        p.write_bytes(b"half a file")
        os.utime(p, (atomic.STARTED - 60, atomic.STARTED - 60))
    live = checkpoints / f".finetune.pt.c{atomic.TEMP_SUFFIX}"  # a write of this process: not stale
    live.write_bytes(b"in progress")
    other = tmp_path / ".notes.tmp"  # not ours: never touched
    other.write_bytes(b"")
    os.utime(other, (atomic.STARTED - 60, atomic.STARTED - 60))
    lock.acquire(tmp_path)
    lock.release(tmp_path)
    assert not any(p.exists() for p in old) and live.exists() and other.exists()


FACTORY = """
import sys


def Net(num_classes=10):
    sys.exit(0)
"""


def test_a_factory_that_calls_sys_exit_is_a_failed_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "quits.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, lines = command([*TINY, "model=custom", "model.target=quits:Net", "hydra.run.dir=run"], monkeypatch, capsys)
    assert code == 2 and lines == ["error: model.target: the factory called sys.exit(0)"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status == {"status": "failed", "error": "model.target: the factory called sys.exit(0)"}


def test_the_largest_seed_feeds_every_generator_and_a_larger_one_is_refused(tmp_path):
    widest = SEED_MAX + NETWORK_STRIDE * 100  # grafting's networks draw from seed + k x stride
    epoch_generator("cpu", widest, "finetune", 10_000)
    torch.Generator().manual_seed(derived(widest, "knockoff"))
    numpy_rng(SEED_MAX, 3)
    with pytest.raises(UserError) as e:
        validate(compose_config(*TINY, f"seed={SEED_MAX + 1}"))
    assert str(e.value).startswith("seed: ") and "4294967295" in str(e.value)


@pytest.mark.slow
def test_a_run_with_the_largest_seed(tmp_path):
    rows = pipeline.run(
        compose_config(*TINY, f"seed={SEED_MAX}", "schedule.pretrain.epochs=1", "schedule.finetune.epochs=1"),
        tmp_path,
    )
    lock.release(tmp_path)
    assert [r["stage"] for r in rows] == ["init", "pretrain", "prune", "finetune"]


def test_a_width_multiplier_that_empties_layers_is_refused_under_its_own_name(tmp_path):
    with pytest.raises(UserError) as e:
        pipeline.run(compose_config(*TINY, "model.width_mult=0.01"), tmp_path / "run")
    assert e.value.option == "model.width_mult"
    assert (
        str(e.value) == "model.width_mult: 0.01 rounds resnet20's 16-channel layers to 0 channels; use at least 0.0312"
    )
    lock.release(tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


NET = nn.Sequential(
    nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
)
X = torch.zeros(1, 3, 8, 8)


@pytest.mark.parametrize(
    "args,options,error,message",
    [
        ((NET, torch.zeros(1, 4, 8, 8), 0.5), {}, ValueError, "example_input: the model does not run on an input of"),
        ((NET, (X,), 0.5), {}, TypeError, "example_input must be one tensor (a batch of inputs), got tuple"),
        ((NET, X.to("meta"), 0.5), {}, ValueError, "example_input is on the meta device"),
        ((NET, X, 0.5), {"scope": "layer"}, ValueError, "scope must be one of ('global', 'group'), got 'layer'"),
        ((NET, X, 0.5), {"normalize": "max"}, ValueError, "normalize must be one of ('mean', 'none'), got 'max'"),
        ((NET, X, 0.5), {"target": "flops"}, ValueError, "target must be one of ('channels', 'params', 'macs', 'lat"),
        ((NET, X, 0.5), {"criterion": "l3"}, ValueError, "criterion must be one of ('l1', 'l2', 'random')"),
        ((NET, X, 0.5), {"min_channels": -1}, ValueError, "min_channels must be an integer >= 0, got -1"),
        ((NET, X, 0.5), {"ratios": 0.5}, TypeError, "unknown option 'ratios'; the options are target, criterion"),
        ((NET, X, "half"), {}, TypeError, "ratio must be a number in (0, 1), got str"),
        ((NET, X, 1.5), {}, ValueError, "ratio must be in (0, 1), got 1.5"),
        ((nn.Linear(5, 3), torch.zeros(1, 5), 0.5), {}, ValueError, "model: no channel can be pruned ("),
    ],
)
def test_the_python_api_refuses_in_one_message_naming_the_argument(args, options, error, message, capfd):
    with pytest.raises(error) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_cli.prune(*args, **options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    out, err = capfd.readouterr()
    assert out == "" and "Traceback" not in err  # torch.fx prints nothing either


def test_the_python_api_on_a_model_with_meta_parameters():
    with pytest.raises(ValueError, match="the model's parameters are on the meta device"):
        prune_cli.prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)).to("meta"), X, 0.5)


def test_integer_inputs_stay_integers_in_the_trace():
    """A network reading token indices (an embedding first) is traced on them as given, not cast to float. (Each of
    the 16 hidden units is 43 of the 770 params: 5 of them come closest to 30%.)"""
    net = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.warns(UserWarning, match="Embedding"):  # its own channels are the embedding's: kept, and said
        pruned, table = prune_cli.prune(net, torch.zeros(1, 5, dtype=torch.long), 0.3)
    assert table["params_removed"] == pytest.approx(5 * 43 / 770)
    assert pruned(torch.ones(2, 5, dtype=torch.long)).shape == (2, 2)
