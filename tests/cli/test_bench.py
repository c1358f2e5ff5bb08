"""`rwkv-chat bench`: runs on the demo model and on a checkpoint, prints its figures, and (with
--compare-reference) the reference's figures and the ratios; kept to a few tokens."""
from __future__ import annotations

import json
import re

import pytest

from rwkv_chat.benchmark import BenchResult, ratio_lines
from rwkv_chat.cli import cli

TINY = ["--prompt-tokens", "6", "--decode-tokens", "3", "--chunk-len", "4", "--repeats", "2"]
NUMBER = r"(\d+\.\d+)"


def bench(runner, *args):
    result = runner.invoke(cli, ["bench", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def figures(line: str) -> dict[str, float]:
    """prefill/decode tok/s, TTFT ms, peak RSS and model MiB from one printed result line."""
    pattern = (rf"prefill +{NUMBER} tok/s +decode +{NUMBER} tok/s +TTFT +{NUMBER} ms +peak RSS +(\d+) MiB "
               rf"+model +(-?\d+) MiB")
    match = re.search(pattern, line)
    assert match, line
    return dict(zip(("prefill", "decode", "ttft", "peak", "model"), map(float, match.groups())))


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    from rwkv_chat.demo import demo_model_path

    return demo_model_path(tmp_path_factory.mktemp("demo-cache"))


def test_bench_on_the_demo_model_prints_its_figures(runner, demo_path, monkeypatch):
    import rwkv_chat.demo as demo

    monkeypatch.setattr(demo, "demo_model_path", lambda: demo_path)  # never the real user cache
    output = bench(runner, "--demo", *TINY).splitlines()
    assert re.fullmatch(rf"model {re.escape(str(demo_path))} \(v7\), prompt 6 tokens in chunks of 4, "
                        r"3 decode tokens, \d+ threads, best of 2", output[0]), output[0]
    assert len(output) == 2 and "rwkv-chat" in output[1] and "cpu fp32" in output[1]
    numbers = figures(output[1])
    assert numbers["prefill"] > 0 and numbers["decode"] > 0 and numbers["ttft"] > 0
    assert numbers["peak"] >= numbers["model"] > 0  # the demo's weights are tens of MiB
    assert 6 / numbers["prefill"] == pytest.approx(numbers["ttft"] / 1000, rel=0.05)  # TTFT is the prefill time


def test_bench_json_holds_every_run(runner, model_path):
    data = json.loads(bench(runner, "-m", model_path, *TINY, "--json"))
    ours = data["ours"]
    assert data["reference"] == []
    assert (ours["implementation"], ours["version"], ours["prompt_tokens"], ours["decode_tokens"]) == ("rwkv-chat", "7", 6, 3)
    assert len(ours["prefill_runs"]) == len(ours["decode_runs"]) == 2
    assert ours["prefill_tok_s"] == max(ours["prefill_runs"]) > 0
    assert ours["decode_tok_s"] == max(ours["decode_runs"]) > 0
    assert ours["error"] == ""


def test_bench_against_the_reference_prints_both_and_the_ratios(runner, model_path):
    output = bench(runner, "-m", model_path, "--prompt-tokens", 4, "--decode-tokens", 2, "--repeats", 1,
                   "--compare-reference").splitlines()
    assert len(output) == 4, output
    ours, reference, ratios = figures(output[1]), figures(output[2]), output[3]
    assert output[2].split()[:3] == ["rwkv", "0.8.32", "cpu"], output[2]
    assert reference["prefill"] > 0 and reference["decode"] > 0
    match = re.fullmatch(rf"  vs reference 'cpu fp32': prefill x{NUMBER}, decode x{NUMBER}", ratios)
    assert match, ratios
    # the printed ratios are the printed rates divided (to their printed precision)
    assert float(match[1]) == pytest.approx(ours["prefill"] / reference["prefill"], rel=0.02, abs=0.01)
    assert float(match[2]) == pytest.approx(ours["decode"] / reference["decode"], rel=0.02, abs=0.01)


def test_ratios_without_decode_figures_name_the_prefill_only():
    """--decode-tokens 0 against two reference strategies (v7 int8): no decode ratio, no crash."""
    ours = BenchResult("rwkv-chat", "cpu bf16i8", "m", prefill_tok_s=100.0)
    refs = [BenchResult("rwkv 0.8.32", "cpu fp32", "m", prefill_tok_s=50.0),
            BenchResult("rwkv 0.8.32", "cpu bf16", "m", prefill_tok_s=40.0),
            BenchResult("rwkv 0.8.32", "cuda fp16", "m", error="no GPU")]
    assert ratio_lines(ours, refs) == ["  vs reference 'cpu fp32': prefill x2.00",
                                       "  vs reference 'cpu bf16': prefill x2.50",
                                       "  vs the reference's best: prefill x2.00"]
    ours.decode_tok_s, refs[0].decode_tok_s, refs[1].decode_tok_s = 30.0, 10.0, 20.0
    assert ratio_lines(ours, refs)[1:] == ["  vs reference 'cpu bf16': prefill x2.50, decode x1.50",
                                           "  vs the reference's best: prefill x2.00, decode x1.50"]


def test_reference_gets_float_strategies_where_it_lacks_the_format():
    from rwkv_chat.benchmark import reference_strategies

    assert reference_strategies("cpu  bf16i8", "6") == ["cpu bf16i8"]
    assert reference_strategies("cpu bf16i8", "7") == ["cpu fp32", "cpu bf16"]  # no v7 int8 there
    assert reference_strategies("cpu bf16i8a8 *2 -> cpu fp32", "6") == ["cpu bf16i8 *2 -> cpu fp32"]
    assert reference_strategies("cpu bf16i4 *8 -> cpu bf16i8", "6") == ["cpu fp32", "cpu bf16"]  # no int4 at all


class _WritesMarker:
    """Unpickling this runs code: it creates the file named `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_reference_runs_the_file_we_checked_and_never_a_pickles_code(runner, model_path, tmp_path, monkeypatch):
    import shutil

    import torch

    from rwkv_chat.benchmark import bench_reference

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's old default, as before 2.6
    marker = tmp_path / "code-ran"
    ours = shutil.copy(model_path, tmp_path / "model")  # what `-m model` loads ...
    torch.save({"emb.weight": _WritesMarker(marker)}, tmp_path / "model.pth")  # ... not this one beside it
    result = runner.invoke(cli, ["bench", "-m", ours, "--prompt-tokens", "4", "--decode-tokens", "2", "--repeats",
                                 "1", "--compare-reference"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert figures(result.output.splitlines()[2])["decode"] > 0
    evil = bench_reference(tmp_path / "model.pth", "cpu fp32", 4, 2, 4, 1)
    assert "weights" in evil.error.lower() or "global" in evil.error.lower(), evil.error
    assert not marker.exists()


def test_bench_fails_when_the_reference_cannot_run(runner, model_path, monkeypatch):
    import rwkv_chat.benchmark as benchmark

    monkeypatch.setattr(benchmark, "reference_available", lambda: False)
    result = runner.invoke(cli, ["bench", "-m", model_path, *TINY, "--compare-reference"])
    assert result.exit_code == 1 and "the reference package is not installed" in result.output
