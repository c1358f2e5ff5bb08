"""Every bad input gives the project's own exception with a message naming the file and the problem."""
import builtins
import sys

import pytest
import torch

from rwkv_chat import RWKV
from rwkv_chat.errors import DeviceUnavailableError, ModelLoadError, StateMismatchError, StrategyError, TokenError
from rwkv_chat.testing.checkpoints import make_checkpoint, make_state_file, save_checkpoint


@pytest.fixture(scope="module")
def v7_weights():
    return make_checkpoint("7", 2, 64, seed=1)


def write(tmp_path, name, sd):
    path = tmp_path / name
    save_checkpoint(path, sd)
    return path


def load_error(path, strategy="cpu fp32") -> str:
    with pytest.raises(ModelLoadError) as info:
        RWKV(path, strategy)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_file(tmp_path):
    message = load_error(tmp_path / "nothing.pth")
    assert "nothing.pth" in message and "no such file" in message


def test_path_without_suffix_is_accepted(tmp_path, v7_weights):
    write(tmp_path, "model.pth", v7_weights)
    assert RWKV(tmp_path / "model").version == "7"


def test_directory(tmp_path):
    assert "is a directory" in load_error(tmp_path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, I am not a model")
    message = load_error(path)
    assert "notes.pth" in message and "not a readable PyTorch checkpoint" in message


def test_truncated_file(tmp_path, v7_weights):
    path = write(tmp_path, "cut.pth", v7_weights)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable PyTorch checkpoint" in load_error(path)


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (builtins.exec, ("import pathlib; pathlib.Path('pwned').write_text('x')",))

    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": Evil()}, path)
    load_error(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_key(tmp_path, v7_weights):
    sd = dict(v7_weights)
    del sd["blocks.1.att.key.weight"]
    assert "missing key 'blocks.1.att.key.weight'" in load_error(write(tmp_path, "m.pth", sd))


def test_misshaped_key(tmp_path, v7_weights):
    sd = dict(v7_weights)
    sd["blocks.0.ffn.value.weight"] = torch.zeros(64, 100)
    message = load_error(write(tmp_path, "m.pth", sd))
    assert "'blocks.0.ffn.value.weight' has shape [64, 100], expected [64, 256]" in message


def test_nan_weights(tmp_path, v7_weights):
    sd = dict(v7_weights)
    sd["blocks.1.att.output.weight"] = sd["blocks.1.att.output.weight"].clone()
    sd["blocks.1.att.output.weight"][3, 4] = float("nan")
    assert "'blocks.1.att.output.weight' contains NaN or infinite values" in load_error(write(tmp_path, "m.pth", sd))


def test_missing_layer(tmp_path):
    sd = make_checkpoint("4", 3, 64, seed=1)
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    assert "layers [1] are missing" in load_error(write(tmp_path, "m.pth", sd))


def test_v5_0_is_refused(tmp_path):
    sd = make_checkpoint("5.2", 2, 128, seed=1)
    sd = {k: v for k, v in sd.items() if ".gate." not in k and "time_mix_g" not in k}
    assert "RWKV-5.0/5.1" in load_error(write(tmp_path, "old.pth", sd))


def test_unknown_layout(tmp_path):
    sd = {"emb.weight": torch.zeros(10, 4), "blocks.0.mlp.weight": torch.zeros(4, 4)}
    assert "unknown RWKV layout" in load_error(write(tmp_path, "m.pth", sd))


def test_not_rwkv_at_all(tmp_path):
    assert "not an RWKV checkpoint" in load_error(write(tmp_path, "m.pth", {"weight": torch.zeros(3)}))


def test_non_tensor_entry(tmp_path, v7_weights):
    path = tmp_path / "m.pth"
    torch.save({**v7_weights, "notes": "hello"}, path)
    assert "entry 'notes' is a str, not a tensor" in load_error(path)


def test_chatrwkv_converted_file(tmp_path, v7_weights):
    path = tmp_path / "m.pth"
    torch.save({**v7_weights, "_strategy": "cuda fp16", "_version": "0.7", "_rescale_layer": 6}, path)
    assert "pre-converted by ChatRWKV for strategy 'cuda fp16'" in load_error(path)


def test_state_file_given_as_model(tmp_path):
    path = write(tmp_path, "state.pth", make_state_file("7", 2, 64, 64, seed=1))
    assert "is a tuned state file, not a model" in load_error(path)


def test_bad_strategy_fails_before_loading(tmp_path):
    with pytest.raises(StrategyError) as info:
        RWKV(tmp_path / "missing.pth", "cuda fp17")
    assert "'cuda fp17'" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_absent_cuda_names_the_segment(tmp_path, v7_weights):
    path = write(tmp_path, "m.pth", v7_weights)
    with pytest.raises(DeviceUnavailableError) as info:
        RWKV(path, "cpu fp32 *1 -> cuda fp16")
    assert "'cuda fp16' needs CUDA" in str(info.value)


def test_absent_directml_names_the_segment(tmp_path, v7_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_directml", None)  # import fails as if not installed
    path = write(tmp_path, "m.pth", v7_weights)
    with pytest.raises(DeviceUnavailableError) as info:
        RWKV(path, "dml fp32")
    assert "'dml fp32' needs DirectML" in str(info.value)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the error raised when MPS is absent")
def test_absent_mps_names_the_segment(tmp_path, v7_weights):
    with pytest.raises(DeviceUnavailableError, match="'mps fp16' needs Apple MPS"):
        RWKV(write(tmp_path, "m.pth", v7_weights), "mps fp16")


def test_invalid_rescale_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_RESCALE_LAYER", "six")
    with pytest.raises(StrategyError, match="RWKV_RESCALE_LAYER='six'"):
        RWKV(write(tmp_path, "m.pth", make_checkpoint("6", 2, 64, seed=1)), "cpu fp16")


def test_state_from_another_model_is_refused(tmp_path, v7_weights):
    small = RWKV(write(tmp_path, "a.pth", v7_weights))
    other = RWKV(write(tmp_path, "b.pth", make_checkpoint("7", 3, 64, seed=1)))
    _, state = small.forward([1, 2])
    with pytest.raises(StateMismatchError) as info:
        other.forward([3], state)
    assert "2 layers" in str(info.value) and "3 layers" in str(info.value)


def test_bad_tokens(tmp_path, v7_weights):
    model = RWKV(write(tmp_path, "m.pth", v7_weights))
    with pytest.raises(ValueError, match="non-empty"):
        model.forward([])
    with pytest.raises(TokenError, match=r"token id 65536 is outside the vocabulary of m.pth .65536 tokens"):
        model.forward([65536])


def test_environment_switches_unset_are_fine(tmp_path, v7_weights, monkeypatch):
    for name in ("RWKV_JIT_ON", "RWKV_CUDA_ON", "RWKV_DML_ON", "RWKV_RESCALE_LAYER"):
        monkeypatch.delenv(name, raising=False)
    model = RWKV(write(tmp_path, "m.pth", v7_weights))
    assert model.forward([1])[0].shape == (65536,)


# ------------------------------------------------------------------ the Python API's other inputs


def test_api_inputs_outside_the_model_raise_the_error_family():
    from rwkv_chat import Tokenizer
    from rwkv_chat.engine.strategy import parse_strategy
    from rwkv_chat.errors import RWKVChatError, SamplingError
    from rwkv_chat.sampling import Sampler, SamplingSettings

    cases = [
        (lambda: SamplingSettings(max_tokens=-3), SamplingError, "max_tokens"),
        (lambda: SamplingSettings(temperature=float("inf")), SamplingError, "temperature"),
        (lambda: Tokenizer().encode("bad \udcff text"), TokenError, "position 4"),
        (lambda: Tokenizer().decode([10**9]), TokenError, "1000000000"),
        (lambda: parse_strategy(5), StrategyError, "must be a string"),
        (lambda: Sampler(seed=1).sample(torch.full((5,), -torch.inf), SamplingSettings()), SamplingError, "banned"),
        (lambda: Sampler(seed=1).sample(torch.tensor([0.0, torch.nan]), SamplingSettings()), SamplingError, "NaN"),
        (lambda: Sampler(seed=1).sample(torch.tensor([0.0, torch.inf]), SamplingSettings()), SamplingError, "infinite"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words) as raised:
            call()
        assert isinstance(raised.value, RWKVChatError)


def test_minus_infinity_is_a_ban_the_sampler_accepts():
    from rwkv_chat.sampling import Sampler, SamplingSettings

    logits = torch.zeros(50)
    logits[:49] = -torch.inf  # everything banned but token 49
    draws = {Sampler(seed=seed).sample(logits, SamplingSettings(temperature=1.0, top_p=1.0)) for seed in range(20)}
    assert draws == {49}
