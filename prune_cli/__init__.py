"""prune_cli: config-driven structured pruning research (pretrain -> sparse-train -> prune -> retrain)."""

__version__ = "0.1.0"


def load(path, stage=None):
    """``(model, metadata)``: the pruned model of a run directory (its last finished stage, or ``stage``) or of a
    checkpoint file, rebuilt on the CPU in eval mode, without Hydra. See ``prune_cli.deploy.load``."""
    from .deploy import load as load_run  # imported on use: ``import prune_cli`` stays light

    return load_run(path, stage)
