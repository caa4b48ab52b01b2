"""How a model trains and is measured: the trainer settings, the training loop with its registries of optimizers,
learning-rate schedules and hooks, evaluation and latency timing."""
