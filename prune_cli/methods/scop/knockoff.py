"""Knockoff images for SCOP: the pretrained CIFAR generator G, its loader, and sampling x_kf = G(z).

SCOP (Tang et al., NeurIPS 2020) contrasts each channel with the same channel fed by "knockoff" images:
samples of a generator trained on CIFAR-10, used as they are (the generator is frozen; only the pruned
network's scaling factors learn). The generator here mirrors the authors' CIFAR generator so that their
``netG_cifar.pth`` loads strictly:

    z ~ N(0, I_128) -> Linear(128, 4096) + BatchNorm1d + ReLU -> view 256x4x4
    -> ConvTranspose2d(256, 128, 2, stride 2) + BN + ReLU               (8x8)
    -> ConvTranspose2d(128, 64, 2, stride 2) + BN + ReLU                (16x16)
    -> ConvTranspose2d(64, 3, 2, stride 2) -> tanh                      (3x32x32, in [-1, 1])

State-dict keys (dim 64): ``linear1.{weight,bias}``, ``bn1.*``, ``block1.0.*`` (deconv), ``block1.1.*`` (BN),
``block2.0.*``, ``block2.1.*``, ``deconv_out.{weight,bias}``. The authors load the file into the generator
wrapped in ``DataParallel``, so their saved keys carry a ``module.`` prefix; :func:`load_generator` accepts the
keys with or without it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from prune_cli.core.errors import UserError

LATENT = 128
OPTION = "schedule.scop.generator_path"
_PREFIX = "module."  # added by DataParallel when the authors saved the generator


class CifarKnockoffGenerator(nn.Module):
    """The SCOP CIFAR generator: ``forward(z)`` maps (B, 128) latents to (B, 3, 32, 32) images in [-1, 1].

    Attribute names and Sequential indices are those of the published weights; renaming any of them breaks
    loading the authors' file.
    """

    def __init__(self, dim: int = 64):
        super().__init__()
        self.dim = dim
        self.linear1 = nn.Linear(LATENT, 4 * 4 * 4 * dim)
        self.bn1 = nn.BatchNorm1d(4 * 4 * 4 * dim)
        self.relu1 = nn.ReLU(inplace=True)
        self.block1 = nn.Sequential(
            nn.ConvTranspose2d(4 * dim, 2 * dim, 2, stride=2), nn.BatchNorm2d(2 * dim), nn.ReLU(inplace=True)
        )
        self.block2 = nn.Sequential(
            nn.ConvTranspose2d(2 * dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )
        self.deconv_out = nn.ConvTranspose2d(dim, 3, 2, stride=2)
        self.tanh = nn.Tanh()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.linear1(z)))
        x = x.view(-1, 4 * self.dim, 4, 4)
        x = self.block2(self.block1(x))
        return self.tanh(self.deconv_out(x))


def _first_line(text: str, limit: int = 120) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_state(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UserError(OPTION, f"no such file: {path}")
    try:
        # weights_only: a downloaded checkpoint must not be able to run code when unpickled
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's messages here run to many lines of advice; the exception kind is enough
        why = f"cannot read {path}: not a torch file of tensors only ({type(e).__name__})"
        raise UserError(OPTION, why) from e
    if not isinstance(state, Mapping):
        raise UserError(OPTION, f"{path} holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(OPTION, f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}")
    if state and all(k.startswith(_PREFIX) for k in state):
        state = {k[len(_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def _check_against(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Name the first problem ourselves: torch's own message lists every key over many lines."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(OPTION, f"not the SCOP CIFAR generator: missing key {missing[0]!r}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserError(OPTION, f"not the SCOP CIFAR generator: unexpected key {unexpected[0]!r}")
    for key, want in expected.items():
        if key in state and state[key].shape != want.shape:
            got = tuple(state[key].shape)
            raise UserError(
                OPTION, f"not the SCOP CIFAR generator: {key} has shape {got}, expected {tuple(want.shape)}"
            )


def load_generator(path: str, device) -> nn.Module:
    """Load the CIFAR knockoff generator from a state-dict file: strict, in eval mode, frozen, on ``device``.

    Every problem with the file raises :class:`UserError` on ``schedule.scop.generator_path``.
    """
    generator = CifarKnockoffGenerator()
    state = _read_state(path)
    expected = generator.state_dict()
    # files saved by torch < 0.4.1 have no BN batch counter; it only matters in training, so start it at 0
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    _check_against(state, expected)
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the checks above should leave nothing for torch to refuse; one line if it does
        raise UserError(OPTION, f"not the SCOP CIFAR generator: {_first_line(str(e))}") from e
    # eval: BN uses the stored running statistics, so a knockoff does not depend on the rest of its batch
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return generator.to(device)


def knockoffs(generator: nn.Module, n: int, generator_rng: torch.Generator | None = None) -> torch.Tensor:
    """``n`` knockoff images ``G(z)``, z ~ N(0, I_128) fresh, on the generator's device, without autograd."""
    param = next(generator.parameters())
    # draw where the random generator lives (a CPU generator cannot fill a CUDA tensor), then move
    rng_device = generator_rng.device if generator_rng is not None else param.device
    z = torch.randn(n, LATENT, generator=generator_rng, device=rng_device, dtype=param.dtype)
    with torch.no_grad():
        return generator(z.to(param.device))
