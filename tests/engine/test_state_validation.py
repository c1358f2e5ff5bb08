"""Every state reaching `forward` is checked against the model first (layer count, every tensor's
shape, dtype, device, layout): hostile Python inputs get StateMismatchError / TokenError, never a
crash, a silent partial run or a wrong result. Bad checkpoints and logits get our errors too."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.engine import loader
from rwkv_chat.engine.state import RWKVState
from rwkv_chat.errors import ModelLoadError, RWKVChatError, SamplingError, StateMismatchError, TokenError
from rwkv_chat.sampling import Sampler, SamplingSettings
from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """v7, 2 layers x 64 (2 heads of 32), vocabulary of 100 tokens."""
    path = tmp_path_factory.mktemp("small") / "v7-small-vocab.pth"
    save_checkpoint(path, make_checkpoint("7", 2, 64, head_size=32, vocab_size=100))
    return RWKV(path, progress=None)


@pytest.fixture(scope="module")
def small_v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "v4.pth"
    save_checkpoint(path, make_checkpoint("4", 2, 64, vocab_size=100))
    return RWKV(path, progress=None)


def _with(model, layer: int, index: int, value) -> RWKVState:
    state = model.zero_state()
    state.layers[layer][index] = value
    return state


BAD_TENSORS = {
    "3x3 matrix (used to segfault)": (0, 1, lambda: torch.zeros(3, 3), "shape [3, 3], expected [2, 32, 32]"),
    "four heads instead of two": (1, 1, lambda: torch.zeros(4, 32, 32), "shape [4, 32, 32]"),
    "int32 matrix": (0, 1, lambda: torch.zeros(2, 32, 32, dtype=torch.int32), "dtype torch.int32"),
    "float64 token shift": (1, 0, lambda: torch.zeros(64, dtype=torch.float64), "dtype torch.float64"),
    "transposed (not contiguous)": (0, 1, lambda: torch.zeros(2, 32, 32).transpose(1, 2), "not contiguous"),
    "sparse": (0, 2, lambda: torch.zeros(64).to_sparse(), "layout"),
    "meta device": (0, 2, lambda: torch.zeros(64, device="meta"), "device meta"),
    "a list": (0, 0, lambda: [0.0] * 64, "is a list, not a tensor"),
    "None": (1, 2, lambda: None, "is a NoneType"),
}


@pytest.mark.parametrize("name", BAD_TENSORS)
def test_a_wrong_state_tensor_is_refused_naming_layer_and_index(small, name):
    layer, index, make, expected = BAD_TENSORS[name]
    state = _with(small, layer, index, make())
    with pytest.raises(StateMismatchError) as info:
        small.forward([5], state)
    assert f"state layer {layer} tensor {index}" in str(info.value) and expected in str(info.value)


def test_wrong_layer_structure_is_refused(small, small_v4):
    one_layer = small.zero_state()
    one_layer.layers = one_layer.layers[:1]  # used to run one layer silently
    with pytest.raises(StateMismatchError, match="state has 1 layers; .* needs 2"):
        small.forward([5], one_layer)
    short = small.zero_state()
    short.layers[1] = short.layers[1][:2]
    with pytest.raises(StateMismatchError, match="state layer 1 has 2 tensors; this model needs 3"):
        small.forward([5], short)
    with pytest.raises(StateMismatchError, match="expected an RWKVState, got dict"):
        small.forward([5], {"layers": []})
    v4_state = small_v4.zero_state()
    with pytest.raises(StateMismatchError, match="RWKV v4"):
        small.forward([5], v4_state)
    bad_tokens = small.zero_state()
    bad_tokens.tokens = "3"
    with pytest.raises(StateMismatchError, match="state.tokens"):
        small.forward([5], bad_tokens)


def test_a_valid_state_still_runs_and_is_left_alone(small):
    _, state = small.forward([1, 2, 3])
    before = state.copy()
    logits, _ = small.forward([4], state)
    assert all(torch.equal(a, b) for la, lb in zip(state.layers, before.layers) for a, b in zip(la, lb))
    assert logits.shape == (100,) and bool(torch.isfinite(logits).all())


def test_wrong_shape_state_does_not_kill_the_interpreter(tmp_path):
    """The crash of issue 12 (exit 139 / heap corruption) in a fresh interpreter: now a clean error."""
    path = tmp_path / "m.pth"
    save_checkpoint(path, make_checkpoint("7", 2, 64, head_size=32, vocab_size=100))
    code = textwrap.dedent(f"""
        import torch
        from rwkv_chat import RWKV
        from rwkv_chat.errors import StateMismatchError
        model = RWKV({str(path)!r}, progress=None)
        state = model.zero_state()
        state.layers[0][1] = torch.zeros(3, 3)
        try:
            model.forward([5], state)
        except StateMismatchError:
            print("refused")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "refused", result.stderr[-2000:]


@pytest.mark.parametrize("tokens, message", [
    ([100], r"token id 100 is outside the vocabulary of v7-small-vocab.pth \(100 tokens, ids 0..99\)"),
    ([5, 65529], "token id 65529 is outside .*larger vocabulary"),
    ([-1], "token id -1 is outside"),
    ([], "non-empty"),
    ([[1, 2]], r"shape \[1, 2\]"),
    ([1.5], "must be integers"),
    (["a"], "list of integers"),
    ([2**70], "list of integers"),
    (None, "list of integers"),
])
def test_bad_token_ids_raise_token_error(small, tokens, message):
    with pytest.raises(TokenError, match=message) as info:
        small.forward(tokens)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RWKVChatError)


def test_a_model_with_a_small_vocabulary_refuses_the_tokenizers_ids(small):
    from rwkv_chat.pipeline import Pipeline

    with pytest.raises(TokenError, match=r"v7-small-vocab.pth \(100 tokens"):
        Pipeline(small).generate("Hello, world", settings=SamplingSettings(max_tokens=1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampler_refuses_non_finite_logits(bad):
    logits = torch.zeros(10)
    logits[3] = bad
    for temperature in (0.0, 1.0):
        with pytest.raises(SamplingError, match="1 NaN or \\+infinite value"):
            Sampler(0).sample(logits, SamplingSettings(temperature=temperature))
    logits[3] = float("-inf")  # a ban, as ChatRWKV-style code writes it
    assert Sampler(0).sample(logits, SamplingSettings(temperature=1.0)) != 3
    huge = torch.full((10,), 3e38)  # finite, even though the sum overflows
    huge[7] = 3.4e38
    assert Sampler(0).sample(huge, SamplingSettings(temperature=0)) == 7


def _saved(tmp_path, data, name="x.pth"):
    path = tmp_path / name
    torch.save(data, path)
    return path


def test_checkpoint_refusals_in_our_words(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    cases = {
        "pickled code": ({"emb.weight": Payload()}, "not a tensors-only checkpoint; rwkv-chat refuses to unpickle "
                                                   "code (the file asks for print)"),
        "integer key": ({1: torch.zeros(2)}, "has a key 1 of type int"),
        "sparse": ({"emb.weight": torch.zeros(4, 4).to_sparse()}, "sparse_coo tensor; only dense"),
        "nested dict": ({"emb.weight": {"a": torch.zeros(2)}}, "is a dict, not a tensor"),
        "five axes": ({"emb.weight": torch.zeros(1, 1, 1, 1, 2)}, "has 5 axes"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(ModelLoadError) as info:
            RWKV(_saved(tmp_path, data), progress=None)
        assert message in str(info.value), name
        assert "weights_only" not in str(info.value) and "will likely succeed" not in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a tensors-only checkpoint .damaged or foreign data"):
        loader.read_tensors(garbage)


def test_pickle_protocol_warning_is_not_printed(tmp_path, recwarn):
    import pickle

    path = tmp_path / "p5.pth"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=5))
    with pytest.raises(ModelLoadError, match="not a tensors-only checkpoint"):
        loader.read_tensors(path)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_checkpoint_with_wrong_axes_or_zero_sizes_is_refused(tmp_path):
    sd = make_checkpoint("6", 1, 64, head_size=32, vocab_size=16)
    sd["blocks.0.att.time_maa_w1"] = torch.tensor(1.0)
    with pytest.raises(ModelLoadError, match="time_maa_w1.*expected at least 1 axes"):
        RWKV(_saved(tmp_path, sd), progress=None)
    sd = make_checkpoint("4", 1, 64, vocab_size=16)
    sd["blocks.0.ffn.key.weight"] = torch.zeros(0, 64)
    with pytest.raises(ModelLoadError, match="zero-sized model .ffn size of 0"):
        RWKV(_saved(tmp_path, sd), progress=None)


def test_size_one_axes_are_tolerated(tmp_path):
    """Files differ in size-1 axes ([1, 1, C] mixes); such a file loads and matches the plain one."""
    sd = make_checkpoint("7", 1, 64, head_size=32, vocab_size=16)
    plain = RWKV(_saved(tmp_path, sd, "plain.pth"), progress=None)
    padded = {k: (v.unsqueeze(0) if k in ("blocks.0.ln0.weight", "head.weight") else v) for k, v in sd.items()}
    other = RWKV(_saved(tmp_path, padded, "padded.pth"), progress=None)
    assert torch.equal(plain.forward([1, 2])[0], other.forward([1, 2])[0])
