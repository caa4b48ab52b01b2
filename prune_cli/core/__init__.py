"""The bottom layer: errors, option declarations, registries, seeds, atomic writes, the checkpoint format and
the process group. It imports nothing else of the package."""
