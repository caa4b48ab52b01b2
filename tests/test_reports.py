"""Reports that count right and touch nothing: copies of one run count once, a sweep's jobs that never started and
killed runs are listed and make the exit code 1, the report writes only into --output (a read-only archive is
read), output under a locale without UTF-8, and a sweep whose launcher dies or whose directory is unwritable."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import uuid

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from helpers import TINY, compose_config, run_cli
from prune_cli.cli import report
from prune_cli.reporting.callback import SweepTable
from prune_cli.run.rundir import RunDir

IDENT = {"model": "resnet20", "dataset": "synthetic", "regularizer": "none", "criterion": "l1", "target": "params"}
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def make_run(d, seed, top1, status="done", run_id=True, overrides=None):
    """A finished (or not) run directory as prune-cli writes it: results.csv, status.json, run.json, .hydra/."""
    d.mkdir(parents=True)
    if top1 is not None:
        rows = [
            {"stage": "pretrain", "top1": 70.0, "best_top1": 70.0, "params": 1000, "macs": 10000},
            {"stage": "prune", "top1": 20.0, "best_top1": 20.0, "params": 500, "macs": 4000},
            {"stage": "finetune", "top1": top1, "best_top1": top1, "params": 500, "macs": 4000},
        ]
        ident = {**IDENT, "ratio": 0.5, "seed": seed, "loss": 1.0, "epochs": 1, "seconds": 0.1}
        pd.DataFrame([{**r, **ident} for r in rows]).to_csv(d / "results.csv", index=False)
    (d / "status.json").write_text(json.dumps({"status": status, "error": ""}))
    (d / "run.json").write_text(json.dumps({"run_id": uuid.uuid4().hex} if run_id else {"torch": "2"}))
    (d / ".hydra").mkdir()
    cfg = {"seed": seed, "model": {"name": "resnet20"}, "criterion": {"name": "l1"}, "prune": {"ratio": 0.5}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or [f"seed={seed}"]))


def snapshot(root):
    """Every file and folder below ``root`` with its size and mtime: what "nothing changed" is compared by."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def report_of(capsys, *args):
    """(exit code, stdout, stderr) of prune-cli-report in this process."""
    capsys.readouterr()
    code = report.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_gets_an_id_that_a_resumed_run_keeps(tmp_path):
    cfg = compose_config(*TINY)
    first = RunDir(cfg, tmp_path / "a")
    first.record_provenance(torch.device("cpu"))
    run_id = json.loads((tmp_path / "a" / "run.json").read_text())["run_id"]
    assert len(run_id) == 32 and set(run_id) <= set("0123456789abcdef") and first.provenance["run_id"] == run_id
    (tmp_path / "a" / "checkpoints").mkdir()
    (tmp_path / "a" / "checkpoints" / "pretrain.pt").write_bytes(b"")  # resumed: its checkpoints are there
    RunDir(cfg, tmp_path / "a").record_provenance(torch.device("cpu"))
    assert json.loads((tmp_path / "a" / "run.json").read_text())["run_id"] == run_id
    RunDir(cfg, tmp_path / "b").record_provenance(torch.device("cpu"))
    assert json.loads((tmp_path / "b" / "run.json").read_text())["run_id"] != run_id


@pytest.mark.parametrize("run_id", [True, False], ids=["run_id", "content"])
def test_copies_of_one_run_count_once(tmp_path, capsys, run_id):
    runs = tmp_path / "runs"
    make_run(runs / "0", 0, 61.0, run_id=run_id)
    make_run(runs / "1", 1, 68.8, run_id=run_id)
    shutil.copytree(runs / "0", runs / "0.bak")  # a backup: the same run, not a third seed
    shutil.copytree(runs / "1", runs / "copy" / "1")
    before = snapshot(runs)
    code, out, _ = report_of(capsys, runs, "--format", "json")
    assert code == 0
    row = json.loads(out)["rows"][0]
    assert row["n"] == 2 and row["top1_std"] == pytest.approx(statistics.stdev([61.0, 68.8]))  # 5.52, not 4.51
    assert json.loads(out)["notes"][-1] == "copies of one run, counted once: 0 = 0.bak; 1 = copy/1"
    assert snapshot(runs) == before


def sweep_dir(root, seeds=(0, 1, 2), subdir="${hydra.job.num}"):
    """A sweep directory's multirun.yaml as Hydra writes it (the parts the report reads)."""
    root.mkdir(parents=True)
    hydra = {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "sweep": {"dir": str(root), "subdir": subdir},
        "overrides": {"task": ["criterion=l1", f"seed={','.join(map(str, seeds))}"]},
    }
    OmegaConf.save(OmegaConf.create({"hydra": hydra, "seed": 0}), root / "multirun.yaml")


def test_jobs_that_never_started_and_killed_runs_are_listed_and_exit_1(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep_dir(sweep, seeds=(0, 1, 2, 3, 4, 5, 6))
    for job, seed in ((0, 0), (1, 1), (2, 2)):
        status = "done" if job == 0 else "running"
        make_run(sweep / str(job), seed, 60.0 + job, status=status, overrides=["criterion=l1", f"seed={seed}"])
        (sweep / str(job) / "run.lock").write_text("{}")
    (sweep / "3").mkdir()  # a directory without .hydra: never started
    make_run(sweep / "5", 5, None, overrides=["criterion=l1", "seed=5"])  # killed after taking its lock, before
    (sweep / "5" / "status.json").unlink()  # it recorded anything
    (sweep / "5" / "run.lock").write_text("{}")
    make_run(sweep / "6", 6, None, overrides=["criterion=l1", "seed=6"])  # killed before it took its lock
    for name in ("status.json", "run.json"):
        (sweep / "6" / name).unlink()
    holder = subprocess.Popen(  # job 2's process is alive: it holds its lock
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(sweep / "2" / "run.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(sweep)
        code, out, _ = report_of(capsys, sweep)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1
    assert "| 0 | done |" in out and "| 1 | dead |" in out and "| 2 | running |" in out and "| 5 | dead |" in out
    assert "1 (dead): the run ended without recording how (killed?)" in out
    assert "5 (dead): the run ended without recording how (killed?)" in out and "| 6 | dead |" in out
    assert "never started (2 of 7 jobs): 3 (seed=3); 4 (seed=4)" in out
    assert snapshot(sweep) == before


def test_a_finished_sweep_exits_0(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep_dir(sweep, seeds=(0, 1))
    for seed in (0, 1):
        make_run(sweep / str(seed), seed, 60.0, overrides=["criterion=l1", f"seed={seed}"])
    code, out, _ = report_of(capsys, sweep)
    assert code == 0 and "never started" not in out and "not done:" not in out and "not done (" not in out


def test_the_report_reads_a_read_only_archive_and_writes_only_into_output(tmp_path, capsys):
    archive = tmp_path / "archive"
    sweep_dir(archive, seeds=(0, 1))
    make_run(archive / "0", 0, 61.0, overrides=["criterion=l1", "seed=0"])
    make_run(archive / "1", 1, 62.0, status="failed", overrides=["criterion=l1", "seed=1"])
    before = snapshot(archive)
    subprocess.run(["chmod", "-R", "a-w", str(archive)], check=True)
    try:
        code, out, err = report_of(capsys, archive)
        assert (code, err) == (1, "") and "| 1 | failed |" in out and "## runs grouped by every setting" in out
        code, out_file, _ = report_of(capsys, archive, "--output", tmp_path / "study")
        assert code == 1 and out_file == out
        assert snapshot(archive) == before  # root ignores permissions: nothing below the input changed
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(archive)], check=True)
    written = sorted(p.name for p in (tmp_path / "study").iterdir())
    assert written == ["sweep.csv", "sweep.md", "sweep_summary.csv", "sweep_summary.md"]
    assert (tmp_path / "study" / "sweep.md").read_text(encoding="utf-8") in out
    code, _, err = report_of(capsys, archive, "--plots")
    assert code == 2 and err == "error: --output: --plots writes files: name a folder for them (--output DIR)\n"


@pytest.mark.slow
def test_the_report_prints_under_a_locale_without_utf8(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "0", 0, 61.0)
    make_run(runs / "1", 1, 68.8)
    make_run(runs / "2", 2, None, status="failed")
    before = snapshot(runs)
    r = subprocess.run(
        [sys.executable, "-c", "import sys; from prune_cli.cli.report import main; sys.exit(main())", str(runs)],
        capture_output=True,
        env={**os.environ, **C_LOCALE},
    )
    assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")
    assert b"64.90 +/- 5.52" in r.stdout and r.stdout.isascii()
    assert snapshot(runs) == before


def test_the_sweep_callback_writes_its_tables_and_never_swallows_a_failure(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "sweep"
    sweep_dir(sweep, seeds=(0, 1, 2))
    make_run(sweep / "0", 0, None, status="failed", overrides=["criterion=l1", "seed=0"])
    make_run(sweep / "1", 1, None, status="failed", overrides=["criterion=l1", "seed=1"])
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as e:
        SweepTable().on_multirun_end(config)
    assert e.value.code == 1
    assert {p.name for p in sweep.iterdir()} >= {"sweep.csv", "sweep.md", "sweep_summary.csv", "sweep_summary.md"}
    assert "never started (1 of 3 jobs): 2" in (sweep / "sweep.md").read_text(encoding="utf-8")
    out = capsys.readouterr().out
    assert "never started (1 of 3 jobs): 2 (seed=2)" in out
    monkeypatch.setattr("prune_cli.reporting.callback.write_tables", lambda *a: 1 / 0)  # the tables cannot be written
    with pytest.raises(SystemExit) as e:
        SweepTable().on_multirun_end(config)
    assert e.value.code == 1 and capsys.readouterr().err == "error: sweep tables: ZeroDivisionError: division by zero\n"


def test_an_unwritable_sweep_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "file" / "sweep")}}})
    with pytest.raises(SystemExit) as e:
        SweepTable().on_multirun_start(config)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: hydra.sweep.dir: {tmp_path / 'file' / 'sweep'}: Not a directory\n"


@pytest.mark.slow
def test_a_failing_sweep_exits_non_zero_under_any_locale_and_unwritable_is_one_line(tmp_path, monkeypatch, command):
    args = [sys.executable, "-m", "prune_cli", "-m", *TINY, "prune.ratio=1.5,2"]
    env = {**os.environ, **C_LOCALE, "HYDRA_FULL_ERROR": "0"}
    r = subprocess.run([*args, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, capture_output=True, env=env)
    assert r.returncode == 1 and b"Traceback" not in r.stderr and b"Warning" not in r.stderr
    assert b"| 0 | failed |" in r.stdout and b"+/-" in r.stdout
    assert "not done (2 of 2 jobs)" in (tmp_path / "sweep" / "sweep_summary.md").read_text(encoding="utf-8")
    # refused before any job starts (the message is ASCII, as is this path): the entry point in this process
    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)
    r = command(*args[3:], f"hydra.sweep.dir={tmp_path}/file/sweep")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: hydra.sweep.dir: {tmp_path}/file/sweep: Not a directory"
    assert "Traceback" not in r.stderr


KILLER = """
import os, signal
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, num_classes=10, die=False):
        super().__init__()
        if die:  # as the OOM killer would
            os.kill(os.getpid(), signal.SIGKILL)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))
"""


@pytest.mark.slow
def test_a_killed_joblib_worker_fails_its_job_and_the_table_is_written(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    sweep = tmp_path / "sweep"
    r = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY,
        "debug=smoke",
        "dataset.subset=null",
        "dataset.test_subset=null",
        "model=custom",
        "model.target=killer:Net",
        "+model.kwargs.die=false,true",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode == 1
    assert "the sweep stopped before its last job" in r.stderr and "Traceback" not in r.stderr
    # the one line (after it, Python's multiprocessing may warn of the killed worker's semaphore at shutdown)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: hydra.launcher: TerminatedWorkerError: ")
    jobs = pd.read_csv(sweep / "sweep.csv")
    statuses = dict(zip(jobs["job"].astype(str), jobs["status"]))
    # the pool stops every worker: job 0 finished first (done), was stopped with it (dead, perhaps before it could
    # record anything) or, on a loaded machine, never started (listed as such)
    assert statuses["1"] == "dead"
    assert statuses.get("0") in ("done", "dead") or ("never started" in r.stdout + r.stderr and "0" not in statuses)
    assert (sweep / "sweep_summary.md").is_file() and "| 1 | dead |" in r.stdout
