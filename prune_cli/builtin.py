"""Importing this module registers every built-in part: model families, datasets, regularizers,
criteria and stages. The registries then resolve them by name."""

from . import criteria, data, loss_selection, models, regularizers, stages  # noqa: F401
