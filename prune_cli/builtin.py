"""Importing this module registers every built-in part: model families, datasets, regularizers,
criteria, stages and the methods that bring several of them. The registries then resolve them by name."""

from . import criteria, data, loss_selection, methods, models, regularizers, stages  # noqa: F401
