"""loader.describe: what `rwkv-chat info` shows of a checkpoint or a tuned state file, read without a model."""
from __future__ import annotations

import pytest
import torch

from rwkv_chat.engine import loader
from rwkv_chat.errors import ModelLoadError
from rwkv_chat.testing.checkpoints import make_checkpoint, make_state_file, save_checkpoint


def test_describe_a_model(tmp_path):
    sd = make_checkpoint("6", 3, 128, head_size=64, vocab_size=300)
    path = save_checkpoint(tmp_path / "m.pth", sd)
    facts = loader.describe(tmp_path / "m")  # the .pth suffix may be left out
    assert facts["file"] == str(path) and facts["kind"] == "RWKV model"
    assert (facts["version"], facts["layers"], facts["width"], facts["vocab"]) == ("6", 3, 128, 300)
    assert facts["heads"] == "2 x 64" and facts["ffn"] == sd["blocks.0.ffn.key.weight"].shape[0]
    assert facts["parameters"] == sum(t.numel() for t in sd.values())
    assert facts["size"] == path.stat().st_size and facts["dtype"] == "float32"


def test_describe_a_state_file_and_a_model_with_a_merged_state(tmp_path):
    layers = make_state_file("7", 2, 128, head_size=64)
    path = save_checkpoint(tmp_path / "s.pth", {k: v.to(torch.bfloat16) for k, v in layers.items()})
    facts = loader.describe(path)
    assert facts["kind"] == "tuned state file" and facts["dtype"] == "bfloat16"
    assert (facts["layers"], facts["width"], facts["heads"]) == (2, 128, "2 x 64")
    merged = save_checkpoint(tmp_path / "m.pth", {**make_checkpoint("7", 2, 128, vocab_size=50), **layers})
    assert loader.describe(merged)["kind"] == "RWKV model (with a merged tuned state)"


def test_describe_refuses_a_broken_state_file(tmp_path):
    path = save_checkpoint(tmp_path / "s.pth", {"blocks.0.att.time_state": torch.zeros(2, 64, 64),
                                                 "blocks.2.att.time_state": torch.zeros(2, 64, 64)})
    with pytest.raises(ModelLoadError, match="not numbered"):
        loader.describe(path)
