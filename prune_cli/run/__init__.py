"""One run of the pipeline: the config check, the hub that runs the stages, the run directory (checkpoints, tables,
lock, provenance) and the loggers."""
