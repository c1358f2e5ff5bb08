"""ChatRWKV-style scripts (tests/compat/scripts, written for `rwkv` 0.8.32) run on
rwkv_chat.compat with only their import lines changed, and produce exactly what the oracle
produces from the same checkpoints and numpy seeds: every token, piece of text and flag.

  free_generation.py  forward calls, refine_context, PIPELINE.generate with a callback at five
                      temperature/top_p/top_k/penalty settings (same-seed token equality)
  sampling_loop.py    a hand-written loop editing `out` in place, pipeline.sample_logits,
                      deepcopy'd states, a state built by hand from model.args/model.strategy
  cfg_decoding.py     classifier-free guidance mixing two models' logits
"""
from __future__ import annotations

import concurrent.futures

import pytest

from .conftest import SHAPE
from .script_runner import run_scripts

pytest.importorskip("rwkv")

SCRIPTS = ["free_generation.py", "sampling_loop.py", "cfg_decoding.py"]
VERSIONS = ["7", "4"]


@pytest.fixture(scope="module")
def results(make_model_file):
    """{(version, implementation): {script: RESULTS}}; the oracle's and our subprocess run side
    by side, each running every script on every version."""
    models = {  # 0.8.32 style: names without ".pth" (its v7 class always appends it)
        version: {
            "COMPAT_MODEL": str(make_model_file(version, **SHAPE))[: -len(".pth")],
            "COMPAT_MODEL_B": str(make_model_file(version, seed=1, **SHAPE))[: -len(".pth")],
        }
        for version in VERSIONS
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {name: pool.submit(run_scripts, name, SCRIPTS, models) for name in ("oracle", "compat")}
        done = {name: job.result() for name, job in jobs.items()}
    return {(version, name): done[name][version] for name in done for version in VERSIONS}


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_output_matches_the_oracle(results, version, script):
    ours, expected = results[version, "compat"][script], results[version, "oracle"][script]
    assert ours == expected


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_scripts_did_real_work(results, version):
    free = results[version, "compat"]["free_generation.py"]
    assert free[0] == ["split forward matches", True]
    generations = free[2:]
    assert len(generations) == 5
    for options, text, pieces, _ in generations:
        assert "".join(pieces) == text
    assert len({text for _, text, _, _ in generations}) == 5  # the settings change the draws
    loop = results[version, "compat"]["sampling_loop.py"]
    assert all(len(tokens) > 0 and 0 not in tokens for tokens, _ in loop)
    cfg = results[version, "compat"]["cfg_decoding.py"]
    assert len({tuple(tokens) for _, tokens, _ in cfg}) == 3  # the guidance factor matters
