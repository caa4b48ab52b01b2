"""The generic stages: training (pretrain, sparse_train, finetune, scratch), prune and latency. Methods add their own
stages in ``prune_cli/methods``; the registry discovers both."""

from prune_cli.stages.base import STAGES, Stage, pruning_stages

__all__ = ["STAGES", "Stage", "pruning_stages"]
