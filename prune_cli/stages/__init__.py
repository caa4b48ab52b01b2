"""The registered stages: importing this package registers the built-in ones."""

from . import gates, latency, prune, train  # noqa: F401  (importing registers them)
from .base import STAGES, Stage, pruning_stages

__all__ = ["STAGES", "Stage", "pruning_stages"]
