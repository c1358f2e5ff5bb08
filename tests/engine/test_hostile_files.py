"""Small hostile checkpoints and state files: absurd layer numbers, tensors whose shape claims far
more elements than the file stores (stride-0 views), dtypes and devices rwkv-chat cannot use.
Each is refused at load with ModelLoadError naming the entry, before any element is scanned or
converted (never a memory blow-up, a hang or a raw torch exception); `describe` (rwkv-chat info)
refuses them too. Files torch cannot read at all are explained in plain words."""
from __future__ import annotations

import os

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.chat.state_files import read_state_file_info
from rwkv_chat.engine import loader
from rwkv_chat.engine.state import RWKVState
from rwkv_chat.errors import ModelLoadError, ModelPathError, StateMismatchError
from rwkv_chat.testing.checkpoints import make_checkpoint, make_state_file, save_checkpoint

HUGE_LAYER = "9" * 20
FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


@pytest.fixture(scope="module")
def weights():
    """v7, 2 layers x 64 (2 heads of 32), vocabulary of 100 tokens."""
    return make_checkpoint("7", 2, 64, head_size=32, vocab_size=100)


@pytest.fixture(scope="module")
def model(weights, tmp_path_factory):
    return RWKV(save_checkpoint(tmp_path_factory.mktemp("model") / "v7.pth", weights), progress=None)


@pytest.fixture(scope="module")
def state_layers():
    return make_state_file("7", 2, 64, 32, seed=1)


@pytest.fixture
def memory_cap():
    """Allocations of more than 2 GiB beyond what the process has fail with MemoryError, so a
    regression fails the test instead of exhausting the machine."""
    resource = pytest.importorskip("resource")
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc to size the cap")
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = in_use + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def refusal(path) -> str:
    """The message RWKV(path) and describe(path) both refuse `path` with."""
    with pytest.raises(ModelLoadError) as loading:
        RWKV(path, progress=None)
    with pytest.raises(ModelLoadError) as describing:
        loader.describe(path)
    assert str(describing.value) == str(loading.value)
    return str(loading.value)


def state_file_refusal(model, path) -> str:
    """The message load_state and the state-file listing both refuse `path` with."""
    with pytest.raises(ModelLoadError) as loading:
        model.load_state(path)
    with pytest.raises(ModelLoadError) as listing:
        read_state_file_info(path)
    assert str(listing.value) == str(loading.value)
    return str(loading.value)


def stride_zero(shape) -> torch.Tensor:
    """A tensor of `shape` over one stored value (what torch.save writes for it is a few bytes)."""
    return torch.zeros(1).as_strided(shape, (0,) * len(shape))


# ------------------------------------------------------------------ layer numbers
@pytest.mark.parametrize("number", [HUGE_LAYER, "9" * 5000, "4096"], ids=["20 digits", "5000 digits", "4096"])
def test_an_absurd_layer_number_is_refused_naming_the_entry(tmp_path, weights, memory_cap, number):
    key = f"blocks.{number}.att.r_k"
    path = save_checkpoint(tmp_path / "m.pth", {**weights, key: weights["blocks.0.att.r_k"]})
    message = refusal(path)
    assert f"entry 'blocks.{number[:20]}" in message and "at most 4096 layers" in message


def test_missing_layers_are_reported_without_listing_every_number(tmp_path, weights, memory_cap):
    sd = {**weights, f"blocks.{HUGE_LAYER}.att.r_k": weights["blocks.0.att.r_k"]}
    sd = {key: value for key, value in sd.items() if not key.startswith("blocks.1.")}
    listed = rf"layers \[1, 2, 3, 4, 5, \.\.\.\] are missing .found blocks up to {HUGE_LAYER}"
    with pytest.raises(ModelLoadError, match=listed):
        loader.read_dims(sd, "7", tmp_path / "m.pth")
    one_gap = {key: value for key, value in weights.items() if not key.startswith("blocks.1.")}
    one_gap |= {key.replace("blocks.0.", "blocks.2."): value for key, value in weights.items() if ".0." in key}
    with pytest.raises(ModelLoadError, match=r"layers \[1\] are missing .found blocks up to 2"):
        RWKV(save_checkpoint(tmp_path / "gap.pth", one_gap), progress=None)


# ------------------------------------------------------------------ sizes the file does not store
def test_an_unused_entry_claiming_2_to_the_40_elements_is_refused_at_once(tmp_path, weights, no_hang, memory_cap):
    path = save_checkpoint(tmp_path / "m.pth", {**weights, "extra": stride_zero((1 << 40,))})
    assert path.stat().st_size < 2 * 1024 * 1024
    message = refusal(path)
    assert "entry 'extra' claims 1,099,511,627,776 elements (shape [1099511627776]) but its data holds 1" in message


def test_weights_of_the_right_shapes_over_one_stored_value_are_refused(tmp_path, weights, no_hang, memory_cap):
    """ffn.key / ffn.value claiming 2^32 elements each, consistently: every shape check passes."""
    ffn = 1 << 26
    huge = {key: stride_zero((ffn, 64) if key.endswith("ffn.key.weight") else (64, ffn))
            for key in weights if key.endswith(("ffn.key.weight", "ffn.value.weight"))}
    path = save_checkpoint(tmp_path / "m.pth", {**weights, **huge})
    assert "entry 'blocks.0.ffn.key.weight' claims 4,294,967,296 elements (shape [67108864, 64])" in refusal(path)
    same_shape = {**weights, "blocks.0.ffn.key.weight": stride_zero(tuple(weights["blocks.0.ffn.key.weight"].shape))}
    message = refusal(save_checkpoint(tmp_path / "s.pth", same_shape))
    assert "entry 'blocks.0.ffn.key.weight' claims 16,384 elements" in message


def test_overlapping_strides_are_refused(tmp_path, weights):
    key = "blocks.1.att.output.weight"
    stored = weights[key].clone()
    overlapping = stored.as_strided(stored.shape, (1, 1))  # every row starts one element after the last
    message = refusal(save_checkpoint(tmp_path / "m.pth", {**weights, key: overlapping}))
    assert f"entry {key!r} has overlapping strides [1, 1] for shape [64, 64]" in message


def test_ordinary_views_still_load(tmp_path, weights):
    """Slices and transposes of larger tensors (torch.save keeps the whole storage) are fine."""
    key = "blocks.0.att.output.weight"
    wide = torch.cat([weights[key], torch.zeros(64, 7)], dim=1)
    views = {**weights, key: wide[:, :64], "head.weight": weights["head.weight"].t().contiguous().t()}
    model = RWKV(save_checkpoint(tmp_path / "m.pth", views), progress=None)
    plain = RWKV(save_checkpoint(tmp_path / "plain.pth", weights), progress=None)
    assert torch.equal(model.forward([1, 2])[0], plain.forward([1, 2])[0])


def test_unused_extra_entries_are_never_read(tmp_path, weights):
    extras = {"notes.nan": torch.full((3,), float("nan")), "step": torch.tensor([7]),
              "flags": torch.ones(2, dtype=torch.bool)}
    model = RWKV(save_checkpoint(tmp_path / "m.pth", {**weights, **extras}), progress=None)
    assert model.forward([1])[0].isfinite().all()


# ------------------------------------------------------------------ dtypes and devices
@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_a_float8_weight_is_refused_naming_entry_and_dtype(tmp_path, weights, dtype):
    key = "blocks.0.ffn.key.weight"
    path = save_checkpoint(tmp_path / "m.pth", {**weights, key: weights[key].to(dtype)})
    name = str(dtype).removeprefix("torch.")
    assert (f"{path}: {key!r} is {name}, which rwkv-chat cannot use "
            "(it reads float32, float16, bfloat16, float64)") == refusal(path)


def test_a_meta_tensor_is_refused_naming_the_entry(tmp_path, weights):
    key = "blocks.0.ffn.key.weight"
    path = save_checkpoint(tmp_path / "m.pth", {**weights, key: weights[key].to("meta")})
    assert f"{path}: entry {key!r} is a meta tensor: the file holds its shape but no data" == refusal(path)


@pytest.mark.parametrize("change", ["meta", *FLOAT8], ids=str)
def test_a_state_file_with_a_meta_or_float8_tensor_is_refused(tmp_path, model, state_layers, change):
    key = "blocks.1.att.time_state"
    path = save_checkpoint(tmp_path / "s.pth", {**state_layers, key: state_layers[key].to(change)})
    message = state_file_refusal(model, path)
    assert message.startswith(f"{path}: ") and key in message
    assert ("meta tensor" if change == "meta" else str(change).removeprefix("torch.")) in message
    with pytest.raises(ModelLoadError, match=key):
        loader.describe(path)


def test_a_meta_tensor_in_a_saved_state_is_refused(model):
    tensors = model.zero_state().to_tensors()
    tensors["layer.0.0"] = tensors["layer.0.0"].to("meta")
    with pytest.raises(StateMismatchError, match="saved state layer.0.0 is a meta tensor"):
        model.state_from_tensors(tensors)


# ------------------------------------------------------------------ files torch cannot read
def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


UNREADABLE = {
    "empty": (lambda path: path.write_bytes(b""), "(the file is empty)"),
    "a passwd file": (lambda path: path.write_text("root:x:0:0:root:/root:/bin/bash\n"),
                      "(neither a zip archive, as torch.save writes, nor a safetensors file)"),
    "cut in half": (_cut, "(a zip archive that is damaged, cut short or not written by torch.save"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_files_are_explained_in_plain_words(tmp_path, weights, state_layers, model, case):
    make, reason = UNREADABLE[case]
    checkpoint = save_checkpoint(tmp_path / "m.pth", weights)
    state = save_checkpoint(tmp_path / "s.pth", state_layers)
    make(checkpoint)
    make(state)
    for message, what in ((refusal(checkpoint), "checkpoint"), (state_file_refusal(model, state), "state file")):
        assert f": not a readable PyTorch {what} {reason}" in message
        assert message.endswith(")") and "Errno" not in message and "EOFError" not in message
        assert "list index" not in message and "likelihood" not in message


def test_a_path_is_needed(model):
    expected = r"must be given as a file path .a str or os.PathLike., got (None|3.5) "
    for call in (lambda: RWKV(None), lambda: model.load_state(None), lambda: RWKV(3.5)):
        with pytest.raises(ModelPathError, match=expected):
            call()
    assert issubclass(ModelPathError, TypeError) and issubclass(ModelPathError, ModelLoadError)
