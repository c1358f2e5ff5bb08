"""Tuned state files: save/load round trips per version, cheap listing, fit checks; user folders."""
from __future__ import annotations

import pytest
import torch

from rwkv_chat.chat import locations, list_state_files, read_state_file_info, save_state_file
from rwkv_chat.chat.state_files import StateFileInfo
from rwkv_chat.engine.state import ModelShape
from rwkv_chat.errors import ModelLoadError, StateMismatchError
from rwkv_chat.testing.checkpoints import make_checkpoint, make_state_file

WIDE = (2, 128)  # two heads, so a wrong head or transpose order shows


def random_state_file(path, version="7", n_layer=2, n_embd=128, seed=0):
    torch.save(make_state_file(version, n_layer, n_embd, seed=seed), path)
    return path


@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_saved_state_loads_back_to_the_same_next_logits(load_model, version, tmp_path):
    model = load_model(version, WIDE)
    original_file = random_state_file(tmp_path / "tuned.pth", version)
    state = model.load_state(original_file)

    saved = save_state_file(state, tmp_path / "saved.pth")
    reloaded = model.load_state(saved)

    for tokens in ([33], [510, 33, 261]):
        expected, _ = model.forward(tokens, state)
        actual, _ = model.forward(tokens, reloaded)
        assert torch.equal(actual, expected)
    original = torch.load(original_file, weights_only=True)
    written = torch.load(saved, weights_only=True)
    assert written.keys() == original.keys()
    for key in original:  # the ecosystem layout, [H, N, N] stored [h][v][k], float32
        assert written[key].dtype == torch.float32
        assert torch.equal(written[key], original[key].float())


@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_a_state_after_some_tokens_keeps_its_matrix_state(load_model, version, tmp_path):
    model = load_model(version, WIDE)
    _, state = model.forward([510, 33, 261, 4000], None)
    reloaded = model.load_state(save_state_file(state, tmp_path / "after.pth"))
    for got, want in zip(reloaded.layers, state.layers):
        assert torch.equal(got[1], want[1])  # wkv kept
        assert not got[0].any() and not got[2].any()  # token shift is not part of the format


def test_bf16_files_on_request(load_model, tmp_path):
    model = load_model("7", WIDE)
    state = model.load_state(random_state_file(tmp_path / "tuned.pth"))
    path = save_state_file(state, tmp_path / "half.pth", dtype=torch.bfloat16)
    assert read_state_file_info(path).dtype == "bfloat16"
    model.load_state(path)


def test_v4_states_cannot_be_saved(load_model, tmp_path):
    _, state = load_model("4").forward([33], None)
    with pytest.raises(StateMismatchError, match="v4"):
        save_state_file(state, tmp_path / "v4.pth")
    assert not (tmp_path / "v4.pth").exists()


def test_a_failed_save_keeps_the_previous_file(load_model, tmp_path, monkeypatch):
    model = load_model("7", WIDE)
    path = random_state_file(tmp_path / "tuned.pth")
    before = path.read_bytes()

    def fail(obj, file):
        with open(file, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save_state_file(model.load_state(path), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.pth"]


# ------------------------------------------------------------------ reading and listing
def test_info_reads_the_dimensions(tmp_path):
    info = read_state_file_info(random_state_file(tmp_path / "tuned.pth", n_layer=3, n_embd=192))
    assert (info.name, info.n_layer, info.n_head, info.head_size, info.n_embd) == ("tuned", 3, 3, 64, 192)
    assert info.dtype == "bfloat16" and info.problem is None


def shape(version="7", n_layer=2, n_embd=128):
    return ModelShape(version, n_layer, n_embd, n_embd // 64, 64, 65536)


def test_fits_explains_every_mismatch(tmp_path):
    info = read_state_file_info(random_state_file(tmp_path / "tuned.pth"))
    assert info.fits(shape()) == (True, "")
    assert info.fits(shape(version="5.2")) == (True, "")

    fits, why = info.fits(shape(n_layer=3, n_embd=64))
    assert not fits and "layers 2 (the model has 3)" in why and "width 128 (the model has 64)" in why
    fits, why = info.fits(shape(version="4"))
    assert not fits and "v4" in why
    broken = StateFileInfo(tmp_path / "x.pth", problem="unexpected entry 'emb.weight'")
    assert broken.fits(shape()) == (False, "unexpected entry 'emb.weight'")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ({"blocks.0.att.time_state": torch.zeros(2, 64, 64), "emb.weight": torch.zeros(2)}, "unexpected entry"),
        ({"blocks.1.att.time_state": torch.zeros(2, 64, 64)}, "numbered"),
        ({"blocks.0.att.time_state": torch.zeros(2, 64, 32)}, "expected [heads, N, N]"),
        ({}, "no blocks.N.att.time_state"),
        ([1, 2], "not a dict"),
    ],
)
def test_files_that_are_not_state_files_are_refused(tmp_path, content, problem):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(ModelLoadError, match="odd.pth") as refused:
        read_state_file_info(path)
    assert problem in str(refused.value)


def test_listing_the_user_states_folder(chat_home, tmp_path):
    folder = chat_home / "states"
    folder.mkdir(parents=True)
    random_state_file(folder / "b-wide.pth")
    random_state_file(folder / "a-narrow.pth", n_embd=64)
    torch.save(make_checkpoint("7", 1, 64, vocab_size=128), folder / "c-model.pth")
    (folder / "d-garbage.pth").write_bytes(b"garbage")
    (folder / "notes.txt").write_text("not listed")

    listed = [info for info in list_state_files() if info.path.parent == folder]

    assert [info.name for info in listed] == ["a-narrow", "b-wide", "c-model", "d-garbage"]
    assert [info.n_embd for info in listed[:2]] == [64, 128]
    assert all(info.source == "user" for info in listed)
    assert listed[2].problem and "unexpected entry" in listed[2].problem
    assert listed[3].problem and "not a tensors-only state file" in listed[3].problem
    assert [info.name for info in list_state_files([folder]) if info.problem is None] == ["a-narrow", "b-wide"]


def test_listing_loads_no_tensor_data(tmp_path, monkeypatch):
    path = random_state_file(tmp_path / "tuned.pth")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    read_state_file_info(path)
    assert calls and calls[0].get("mmap") is True and calls[0].get("weights_only") is True


# ------------------------------------------------------------------ user folders
def test_rwkv_chat_home_relocates_every_user_folder(chat_home):
    assert locations.snapshots_dir() == chat_home / "snapshots"
    assert locations.user_states_dir() == chat_home / "states"
    assert locations.config_dir() == chat_home / "config"
    assert locations.state_dirs()[-1] == chat_home / "states"


def test_without_rwkv_chat_home_the_platform_folders_are_used(monkeypatch):
    monkeypatch.delenv(locations.HOME_ENV_VAR, raising=False)
    for folder in (locations.snapshots_dir(), locations.user_states_dir(), locations.config_dir()):
        assert "rwkv-chat" in str(folder)


def test_bundled_states_folders_are_listed_only_when_present():
    assert all(folder.is_dir() and folder.name == "states" for folder in locations.bundled_states_dirs())
