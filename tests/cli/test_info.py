"""`rwkv-chat info` on files `generate` refuses or loads: it says the same about them."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from rwkv_chat.cli import ExitCode, cli
from rwkv_chat.testing.checkpoints import make_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def weights():
    return make_checkpoint("7", 2, 64, head_size=32, vocab_size=100)


def one_line_error(result) -> str:
    assert result.exit_code == ExitCode.BAD_INPUT, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_a_safetensors_checkpoint_is_described_as_a_model(runner, tmp_path, weights):
    path = tmp_path / "v7.safetensors"
    save_file(weights, path)
    result = runner.invoke(cli, ["info", "--json", str(path)])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    described = (facts["kind"], facts["version"], facts["layers"], facts["width"], facts["vocab"])
    assert described == ("RWKV model", "7", 2, 64, 100)
    assert facts["parameters"].endswith(f"({sum(t.numel() for t in weights.values()):,})")


def test_a_safetensors_file_that_is_neither_model_nor_snapshot_is_refused(runner, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, path)
    assert "not an RWKV checkpoint" in one_line_error(runner.invoke(cli, ["info", str(path)]))


def test_a_damaged_snapshot_is_still_refused_as_a_snapshot(runner, tmp_path, weights):
    path = tmp_path / "chat.rwkvchat"
    save_file(weights, path)
    assert "not an rwkv-chat snapshot" in one_line_error(runner.invoke(cli, ["info", str(path)]))


HOSTILE = {
    "float8 weight": (lambda w: {**w, "blocks.0.ffn.key.weight": w["blocks.0.ffn.key.weight"].to(torch.float8_e4m3fn)},
                      "'blocks.0.ffn.key.weight' is float8_e4m3fn, which rwkv-chat cannot use"),
    "meta weight": (lambda w: {**w, "blocks.1.att.r_k": w["blocks.1.att.r_k"].to("meta")},
                    "entry 'blocks.1.att.r_k' is a meta tensor"),
    "2^40 elements over one value": (lambda w: {**w, "extra": torch.zeros(1).as_strided((1 << 40,), (0,))},
                                     "entry 'extra' claims 1,099,511,627,776 elements"),
    "absurd layer number": (lambda w: {**w, "blocks.5000.att.r_k": w["blocks.0.att.r_k"]},
                            "entry 'blocks.5000.att.r_k' names layer 5000; rwkv-chat reads models of at most"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_info_refuses_what_loading_refuses(runner, tmp_path, weights, no_hang, case):
    change, message = HOSTILE[case]
    path = save_checkpoint(tmp_path / "m.pth", change(weights))
    assert message in one_line_error(runner.invoke(cli, ["info", str(path)]))
