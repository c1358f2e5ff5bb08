"""Engine fixtures: tiny random checkpoints in the official layout, one per version and shape."""
import pytest
import torch

from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint

VERSIONS = ("4", "5.2", "6", "7")
# (n_layer, n_embd): two heads of 64, and three heads (not a power of two)
SHAPES = {"two_heads": (2, 128), "three_heads": (3, 192)}


@pytest.fixture(scope="session")
def engine_models(tmp_path_factory):
    """{(version, shape_name): path} for every version at every engine test shape."""
    folder = tmp_path_factory.mktemp("engine-models")
    paths = {}
    for version in VERSIONS:
        for name, (n_layer, n_embd) in SHAPES.items():
            path = folder / f"v{version}-{name}.pth"
            save_checkpoint(path, make_checkpoint(version, n_layer, n_embd, seed=7))
            paths[version, name] = path
    return paths


@pytest.fixture(scope="session")
def token_sequence():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 65536, (14,), generator=generator).tolist()
    return [0, 65535, 11, 261] + tokens  # the vocabulary's ends and two common tokens
