"""prune_cli: config-driven structured pruning research (pretrain -> sparse-train -> prune -> retrain)."""

__version__ = "0.1.0"
