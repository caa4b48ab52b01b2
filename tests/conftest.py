"""Shared test setup: one torch thread (small models run faster so, and tests share the machine)."""
import torch

torch.set_num_threads(1)
