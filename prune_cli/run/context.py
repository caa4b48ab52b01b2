"""What the stages of one run share: the config, the run directory, the device, the data (read lazily),
the input shape and class count, and how a model is measured, tested, built and sampled."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from prune_cli.core import distributed
from prune_cli.core.seeds import derived
from prune_cli.data import batches, describe, load_data, normalize
from prune_cli.engine.evaluate import evaluate
from prune_cli.engine.settings import resolve_device
from prune_cli.importance.criteria import Sample
from prune_cli.models import MODELS, build_model
from prune_cli.structure.counting import count_macs, count_params


class Context:
    def __init__(self, cfg, run):
        self.cfg, self.run = cfg, run
        self.device = distributed.local_device(resolve_device(cfg.trainer.device))
        self.input_shape, self.num_classes = describe(cfg.dataset)
        self._data = None
        self.cost_model = None  # prune.target=latency: the latency cost model, built once (stages/latency_target.py)
        self.teachers = {}  # distill: each teacher built once, shared by the stages it teaches (stages/distill.py)

    @property
    def data(self):
        """The dataset, read on first use: checked against the data the run's checkpoints were trained on, and what was
        read recorded in run.json (a fallback folder also printed) before any stage gets it."""
        if self._data is None:
            data = load_data(self.cfg.dataset, self.cfg.seed, self.device)
            self.run.check_data(data.fingerprint)
            root = str(self.cfg.dataset.get("root"))
            if data.source is not None and distributed.is_main():
                print(f"dataset.root: {root} has no {data.name} files; read {data.source}")
            self.run.record_data({"root": root, "read": data.source or root, "fingerprint": data.fingerprint})
            self._data = data
        return self._data

    def arch(self, model: dict | None = None) -> dict:
        """The ``arch`` of a model block (default: the configured ``model.*`` options) plus the data's input channels
        and classes."""
        arch = OmegaConf.to_container(self.cfg.model, resolve=True) if model is None else dict(model)
        extra = (
            {"image_size": self.input_shape[1]} if getattr(MODELS.get(arch["name"]), "needs_image_size", False) else {}
        )
        return {**arch, "num_classes": self.num_classes, "in_channels": self.input_shape[0], **extra}

    def build(self, arch: dict | None = None, seed_salt: str | None = None):
        """A fresh model on the run's device (``arch``: the configured one), seeded for ``seed_salt`` if given."""
        if seed_salt is not None:
            torch.manual_seed(derived(self.cfg.seed, seed_salt))
        return build_model(arch or self.arch()).to(self.device)

    def measure(
        self,
        stage: str,
        model,
        top1=float("nan"),
        loss=float("nan"),
        best_top1=float("nan"),
        epochs: int = 0,
        seconds: float = 0.0,
    ) -> dict:
        """A ``results.csv`` row of ``model`` after ``stage``."""
        return {
            "stage": stage,
            "top1": top1,
            "best_top1": best_top1,
            "loss": loss,
            "params": count_params(model),
            "macs": count_macs(model, self.input_shape),
            "epochs": epochs,
            "seconds": round(seconds, 2),
        }

    def reference_macs(self) -> int:
        """MACs of the standard (unexpanded, unpruned) model: what PFS targets and Scratch-B budgets refer to."""
        return count_macs(build_model({**self.arch(), "width_mult": 1.0}), self.input_shape)

    def test(self, model) -> tuple[float, float]:
        return evaluate(model, batches(self.data.test, self.data, self.cfg.trainer.eval_batch_size))

    def sample(self, size: int) -> Sample:
        """A fixed, seeded set of ``size`` training images (at most all of them) for data-driven criteria."""
        data = self.data
        n = min(size, len(data.train))
        g = torch.Generator(device=data.train.x.device).manual_seed(derived(self.cfg.seed, "sample"))
        idx = torch.randperm(len(data.train), generator=g, device=data.train.x.device)[:n]
        return Sample(normalize(data.train.take(idx), data), data.train.y[idx])
