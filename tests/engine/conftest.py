"""Engine fixtures: the shared tiny checkpoints at the shapes the engine tests compare."""
import pytest
import torch

VERSIONS = ("4", "5.2", "6", "7")
# (n_layer, n_embd): two heads of 64, and three heads (not a power of two) over three layers
SHAPES = {"two_heads": (2, 128), "three_heads": (3, 192)}


@pytest.fixture(scope="session")
def engine_models(make_model_file):
    """{(version, shape_name): path} for every version at every engine test shape."""
    return {(version, name): make_model_file(version, n_layer=n_layer, n_embd=n_embd, seed=7)
            for version in VERSIONS for name, (n_layer, n_embd) in SHAPES.items()}


@pytest.fixture(scope="session")
def token_sequence():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 65536, (14,), generator=generator).tolist()
    return [0, 65535, 11, 261] + tokens  # the vocabulary's ends and two common tokens
