"""prune_cli: config-driven structured pruning research (pretrain -> sparse-train -> prune -> retrain).

The public Python API is two functions: ``prune_cli.prune`` (any traceable CNN object) and ``prune_cli.load`` (a
run's pruned model, rebuilt without Hydra). Both import their layers on first use, so that ``import prune_cli``
imports neither torch nor Hydra (the one place the package defers an import for weight, not for a circle).
"""

from prune_cli.core.version import __version__


def load(path, stage=None, trust=()):
    """``(model, metadata)``: the pruned model of a run directory (its last finished stage, or ``stage``) or of a
    checkpoint file, rebuilt on the CPU in eval mode, without Hydra. ``trust``: the ``model=custom`` factory targets
    the checkpoint may import and call. See ``prune_cli.deploy.load.load``."""
    from prune_cli.deploy.load import load as load_run

    return load_run(path, stage, trust)


def prune(model, example_input, ratio, **options):
    """``(pruned copy, table)`` of any traceable CNN: coupled channels from its traced graph, lowest L1 first, until
    ``ratio`` of the params are removed. Options and rules: ``prune_cli.structure.any_network.prune``."""
    from prune_cli.structure.any_network import prune as prune_any

    return prune_any(model, example_input, ratio, **options)


__all__ = ["__version__", "load", "prune"]
