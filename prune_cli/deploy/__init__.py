"""Pruned models outside the pipeline: ``load`` rebuilds a run's model, ``export`` writes TorchScript or ONNX."""
