"""prune_cli: config-driven structured pruning research (pretrain -> sparse-train -> prune -> retrain)."""

__version__ = "0.1.0"


def load(path, stage=None):
    """``(model, metadata)``: the pruned model of a run directory (its last finished stage, or ``stage``) or of a
    checkpoint file, rebuilt on the CPU in eval mode, without Hydra. See ``prune_cli.deploy.load``."""
    from .deploy import load as load_run  # imported on use: ``import prune_cli`` stays light

    return load_run(path, stage)


def prune(model, example_input, ratio, **options):
    """``(pruned copy, table)`` of any traceable CNN: coupled channels from its traced graph, lowest L1 first, until
    ``ratio`` of the params are removed. Options and rules: ``prune_cli.anymodel.prune``."""
    from .anymodel import prune as prune_any

    return prune_any(model, example_input, ratio, **options)
