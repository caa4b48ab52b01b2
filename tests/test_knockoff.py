"""SCOP knockoff generator: loads the authors' state-dict layout strictly, samples images, refuses bad files."""

import pytest
import torch

from prune_cli.core.errors import UserError
from prune_cli.methods.scop.knockoff import LATENT, knockoffs, load_generator

OPTION = "schedule.scop.generator_path"

# The layout of the authors' netG_cifar.pth (CIFAR generator, dim 64), written out by hand from their model
# definition, independent of prune_cli.methods.scop.knockoff. ConvTranspose2d weights are (in, out, kH, kW).
OFFICIAL = {
    "linear1.weight": (4096, 128),
    "linear1.bias": (4096,),
    "bn1.weight": (4096,),
    "bn1.bias": (4096,),
    "bn1.running_mean": (4096,),
    "bn1.running_var": (4096,),
    "bn1.num_batches_tracked": (),
    "block1.0.weight": (256, 128, 2, 2),
    "block1.0.bias": (128,),
    "block1.1.weight": (128,),
    "block1.1.bias": (128,),
    "block1.1.running_mean": (128,),
    "block1.1.running_var": (128,),
    "block1.1.num_batches_tracked": (),
    "block2.0.weight": (128, 64, 2, 2),
    "block2.0.bias": (64,),
    "block2.1.weight": (64,),
    "block2.1.bias": (64,),
    "block2.1.running_mean": (64,),
    "block2.1.running_var": (64,),
    "block2.1.num_batches_tracked": (),
    "deconv_out.weight": (64, 3, 2, 2),
    "deconv_out.bias": (3,),
}


def official_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in OFFICIAL.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5  # a variance must stay positive
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def saved(tmp_path, state, name="netG_cifar.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def refusal(path):
    with pytest.raises(UserError) as e:
        load_generator(path, "cpu")
    assert e.value.option == OPTION and "\n" not in e.value.why
    return e.value.why


def test_official_layout_loads_strictly_frozen_and_samples_images(tmp_path):
    state = official_state()
    g = load_generator(saved(tmp_path, state), "cpu")
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    assert torch.equal(g.state_dict()["block1.0.weight"], state["block1.0.weight"])
    x = knockoffs(g, 5, torch.Generator().manual_seed(1))
    assert x.shape == (5, 3, 32, 32) and not x.requires_grad
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    assert torch.equal(x, knockoffs(g, 5, torch.Generator().manual_seed(1)))  # the seed decides the images
    assert LATENT == 128


def test_dataparallel_prefix_and_missing_bn_counter_are_accepted(tmp_path):
    # the authors saved from a DataParallel wrapper; old torch versions saved no BN batch counter
    state = {f"module.{k}": v for k, v in official_state().items() if not k.endswith("num_batches_tracked")}
    g = load_generator(saved(tmp_path, state), "cpu")
    assert torch.equal(g.state_dict()["deconv_out.bias"], state["module.deconv_out.bias"])


def test_renamed_key_refuses_naming_it(tmp_path):
    state = official_state()
    state["block2.3.weight"] = state.pop("block2.1.weight")
    why = refusal(saved(tmp_path, state))
    assert "block2.1.weight" in why and "missing" in why


def test_extra_key_refuses_naming_it(tmp_path):
    state = official_state()
    state["linear2.bias"] = torch.zeros(3)
    assert "linear2.bias" in refusal(saved(tmp_path, state))


def test_wrong_shape_refuses_naming_key_and_shapes(tmp_path):
    state = official_state()
    state["deconv_out.weight"] = torch.zeros(64, 1, 2, 2)  # a grayscale generator
    why = refusal(saved(tmp_path, state))
    assert "deconv_out.weight" in why and "(64, 1, 2, 2)" in why and "(64, 3, 2, 2)" in why


def test_missing_file_refuses(tmp_path):
    assert "no such file" in refusal(str(tmp_path / "absent.pth"))


def test_non_torch_file_refuses(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0)).tolist()))
    assert "cannot read" in refusal(str(path))


def test_wrapped_or_non_dict_file_refuses(tmp_path):
    assert "not a state dict" in refusal(saved(tmp_path, {"netG": official_state()}))
    assert "not a state dict" in refusal(saved(tmp_path, [torch.zeros(1)], "list.pth"))
