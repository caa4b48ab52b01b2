"""``prune_cli.load``: rebuild a run's pruned model (eval mode, CPU) with its metadata, without a Hydra config.

Which checkpoint is "the pruned model" of a run directory: that of its last finished stage, i.e. the last row of
``results.csv`` whose stage left a finished ``checkpoints/<stage>.pt`` (a stage still training has no row yet);
``stage=`` / ``--stage`` picks another one. A checkpoint file is taken as it is.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from torch import nn

from prune_cli.core.checkpoint import load_checkpoint
from prune_cli.core.errors import UserError, one_line
from prune_cli.core.trust import trusting
from prune_cli.data import DATASETS, describe
from prune_cli.models import build_model
from prune_cli.structure.counting import count_macs, count_params


def load(path: str | os.PathLike, stage: str | None = None, trust=()) -> tuple[nn.Module, dict]:
    """``(model, metadata)`` of a run directory (its last finished stage, or ``stage``) or of a checkpoint file.

    The model is rebuilt from the checkpoint's ``arch`` (layers methods added included) on the CPU, in eval mode.
    ``metadata``: ``stage``, ``arch``, ``params`` and ``macs`` (the counting convention of ``measure``),
    ``results`` (the stage's row of ``results.csv``, or of the checkpoint's own rows), ``status`` (the run's, from
    ``status.json``), ``input_shape`` ``(C, H, W)``, ``dataset``, ``mean`` and ``std`` (the normalisation
    ``(x / 255 - mean) / std`` per channel, None when the dataset computes them from its train split),
    ``config`` (the run's resolved config), ``provenance``, ``checkpoint`` and ``run_dir`` (paths).
    ``trust``: the ``model=custom`` factory targets the checkpoint may import and call (``package.module:factory``);
    any other target it names is refused (a checkpoint is data). Bad input raises ``UserError``.
    """
    ck_path, ck, run_dir = _locate(Path(path), stage)
    if not ck.get("done", True):
        raise UserError(
            "--stage" if stage else "run",
            f"{ck_path} is unfinished (its {ck.get('stage')} stage stopped after epoch {ck.get('epoch')}); "
            "resume that run first, or pick a finished stage",
        )
    with trusting(trust):
        model = _rebuild(ck, ck_path)
    return model, _metadata(model, ck, ck_path, run_dir)


def _locate(path: Path, stage: str | None) -> tuple[Path, dict, Path | None]:
    """(checkpoint path, checkpoint, run directory or None) of a run directory's stage or of a checkpoint file."""
    if not path.exists():
        raise UserError("run", f"{path} does not exist")
    if path.is_dir():
        return *_run_checkpoint(path, stage), path
    if stage is not None:
        raise UserError("--stage", f"{path} is the checkpoint of one stage; --stage picks a stage of a run directory")
    ck = _read(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    if run_dir is not None and not (run_dir / "results.csv").is_file():
        run_dir = None
    return path, ck, run_dir


def _rebuild(ck: dict, ck_path: Path) -> nn.Module:
    """The checkpoint's model on the CPU, in eval mode, or one line saying why it does not rebuild."""
    try:
        model = build_model(ck["arch"])
        model.load_state_dict(ck["state_dict"])
    except UserError as e:  # a model family this installation does not know (an extension not imported)
        raise UserError("run", f"{ck_path} does not rebuild ({e})") from None
    except Exception as e:
        raise UserError("run", f"{ck_path} does not rebuild ({one_line(e)})") from None
    model.eval()
    return model


def _metadata(model: nn.Module, ck: dict, ck_path: Path, run_dir: Path | None) -> dict:
    """What ``load`` tells about the model besides itself (its docstring names every key)."""
    config = ck.get("config") or {}
    dataset = config.get("dataset") or {}
    input_shape, mean, std = _input_of(dataset, ck["arch"])
    name = ck.get("stage", ck_path.stem)
    results = _results_row(run_dir, name) if run_dir is not None else None
    if results is None:
        results = next((_clean(r) for r in reversed(ck.get("rows") or []) if r.get("stage") == name), None)
    return {
        "stage": name,
        "arch": ck["arch"],
        "params": count_params(model),
        "macs": count_macs(model, input_shape) if input_shape else None,
        "results": results,
        "status": _status(run_dir) if run_dir is not None else None,
        "input_shape": input_shape,
        "dataset": dataset.get("name"),
        "mean": mean,
        "std": std,
        "config": config or None,
        "provenance": ck.get("provenance"),
        "checkpoint": str(ck_path),
        "run_dir": str(run_dir) if run_dir is not None else None,
    }


def finished_stages(run_dir: Path) -> list[str]:
    """The stages of a run directory that finished with a checkpoint, in the order they ran (``results.csv``)."""
    have = {p.stem for p in (Path(run_dir) / "checkpoints").glob("*.pt")}
    rows = _read_results(run_dir)
    seen: list[str] = []
    for row in rows:
        if row.get("stage") in have and row["stage"] not in seen:
            seen.append(row["stage"])
    return seen


def _run_checkpoint(run_dir: Path, stage: str | None) -> tuple[Path, dict]:
    ck_dir = run_dir / "checkpoints"
    if not ck_dir.is_dir():
        below = sorted(p.parent for p in run_dir.glob("*/checkpoints"))
        hint = f"; it holds runs below it, e.g. {below[0]}" if below else ""
        raise UserError("run", f"{run_dir} is not a run directory or a checkpoint (no checkpoints/){hint}")
    finished = finished_stages(run_dir)
    have = finished + sorted({p.stem for p in ck_dir.glob("*.pt")} - set(finished))  # in the order they ran
    if stage is not None:
        if stage not in have:
            raise UserError("--stage", f"{run_dir} has no checkpoint of stage {stage!r}; it has {_listing(have)}")
        return ck_dir / f"{stage}.pt", _read(ck_dir / f"{stage}.pt")
    for name in reversed(finished):
        ck = _read(ck_dir / f"{name}.pt")
        if ck.get("done", True):
            return ck_dir / f"{name}.pt", ck
    raise UserError(
        "run", f"{run_dir} has no finished stage yet (checkpoints: {_listing(have)}; results.csv lists none of them)"
    )


def _read(path: Path) -> dict:
    """A prune_cli checkpoint from ``path``, or one line saying why it is not one."""
    try:
        ck = load_checkpoint(path)
    except UserError as e:
        raise UserError("run", e.why) from None
    except Exception as e:
        raise UserError("run", f"{path} is not a prune_cli checkpoint ({one_line(e)})") from None
    if not isinstance(ck, dict) or "arch" not in ck or "state_dict" not in ck:
        raise UserError("run", f"{path} is not a prune_cli checkpoint (no arch and state_dict)")
    return ck


def _input_of(dataset: dict, arch: dict) -> tuple[tuple[int, int, int] | None, tuple | None, tuple | None]:
    """(C, H, W) of the recorded dataset and its published normalisation, as far as the config tells them."""

    try:
        shape = tuple(int(s) for s in describe(dataset)[0])
    except Exception:  # an extension's dataset, or a config of another version: not known
        return None, None, None
    if shape[0] != arch.get("in_channels", shape[0]):
        return None, None, None
    spec = DATASETS.get(dataset["name"])
    mean, std = tuple(getattr(spec, "mean", ()) or ()), tuple(getattr(spec, "std", ()) or ())
    return shape, mean or None, std or None


def _read_results(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [_clean(row) for row in csv.DictReader(f)]


def _results_row(run_dir: Path, stage: str) -> dict | None:
    return next((r for r in reversed(_read_results(run_dir)) if r.get("stage") == stage), None)


def _clean(row: dict) -> dict:
    """A results row with numbers as numbers and empty or NaN cells as None (JSON-safe)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            value = None if value == "" else value
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "none"
