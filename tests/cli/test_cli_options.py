"""CLI options across commands: the group's --config reaches subcommands, the demo model's welcome
numbers are `info`'s, a snapshot of the demo is labelled as the demo, `info --paths`, and
`bench` takes -m/--demo/RWKV_CHAT_MODEL like the other commands."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from rwkv_chat import cli as cli_module
from rwkv_chat.cli import ExitCode, cli
from rwkv_chat import demo as demo_module

from .conftest import FakeApp


def invoke(runner, *args, **kwargs):
    return runner.invoke(cli, list(map(str, args)), catch_exceptions=False, **kwargs)


def test_group_config_applies_to_generate(runner, model_path, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[sampling]\nmax_tokens = 3\ntemperature = 0\n")
    result = invoke(runner, "--config", config, "generate", "-m", model_path, "--stats", "Hi")
    assert "3 generated" in result.stderr


def test_group_config_that_is_broken_is_refused_by_the_subcommand(runner, model_path, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[nonsense]\n")
    result = runner.invoke(cli, ["--config", str(bad), "generate", "-m", str(model_path), "Hi"])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "bad.toml" in result.stderr and "unknown section [nonsense]" in result.stderr


def test_subcommand_config_wins_over_the_group_config(runner, model_path, tmp_path):
    group, own = tmp_path / "group.toml", tmp_path / "own.toml"
    group.write_text("[sampling]\nmax_tokens = 3\n")
    own.write_text("[sampling]\nmax_tokens = 5\n")
    result = invoke(runner, "--config", group, "generate", "-m", model_path, "--config", own, "--stats", "Hi")
    assert "5 generated" in result.stderr


def test_demo_welcome_numbers_are_what_info_prints(runner):
    path, note = cli_module.demo_model()
    facts = json.loads(invoke(runner, "info", "--json", path).output)
    parameters = facts["parameters"].split(" ")[0]
    assert f"{parameters} parameters" in note
    assert f"vocabulary {facts['vocab']:,} tokens" in note
    assert f"{facts['layers']} layers, {facts['width']} wide" in note
    compact, token_ids, _ = demo_module.load_compact()
    assert f"trained on {len(token_ids):,} of them" in note
    assert compact["emb.weight"].shape[0] == len(token_ids)


def test_snapshot_of_the_demo_model_is_labelled_as_the_demo(runner, model_path, tmp_path, monkeypatch, fake_app):  # noqa: F811
    from rwkv_chat import RWKV, Pipeline
    from rwkv_chat.chat.session import ChatSession
    from rwkv_chat.sampling import SamplingSettings

    demo_copy = tmp_path / "rwkv7-demo-0123456789abcdef.pth"
    shutil.copy(model_path, demo_copy)
    monkeypatch.setattr(demo_module, "demo_model_path", lambda: demo_copy)
    monkeypatch.setattr(cli_module, "describe_file", lambda path: {
        "version": "7", "layers": 2, "width": 64, "heads": "1 x 64", "vocab": 65536, "parameters": "1.0M (1,000,000)"})
    monkeypatch.setattr(demo_module, "trained_token_count", lambda: 100)
    session = ChatSession(Pipeline(RWKV(demo_copy, progress=None)), SamplingSettings(max_tokens=2))
    list(session.send("hi"))
    snapshot = session.save()

    assert invoke(runner, "--snapshot", snapshot).exit_code == 0
    (app,) = fake_app.made
    assert app.options["model_label"] == "demo model"
    assert app.options["demo_note"] == cli_module.DEMO_STATUS
    FakeApp.made.clear()
    assert invoke(runner, "-m", model_path).exit_code == 0  # another model: no demo label
    (app,) = fake_app.made
    assert app.options["model_label"] is None and app.options["demo_note"] is None


def test_info_paths_prints_the_user_folders(runner, user_home):
    result = invoke(runner, "info", "--paths")
    assert result.exit_code == 0
    assert re.search(rf"^snapshots +{re.escape(str(user_home / 'snapshots'))}$", result.output, re.MULTILINE)
    assert re.search(rf"^user states +{re.escape(str(user_home / 'states'))}$", result.output, re.MULTILINE)
    assert str(user_home / "config" / "config.toml") in result.output
    folders = json.loads(invoke(runner, "info", "--paths", "--json").output)
    assert folders["user_states"] == str(user_home / "states")


def test_info_without_files_or_paths_is_a_usage_error(runner):
    result = runner.invoke(cli, ["info"])
    assert result.exit_code == 2 and "--paths" in result.output and "--demo" in result.output


def test_info_demo_describes_the_demo_model_as_the_readme_says(runner):
    path, note = cli_module.demo_model()
    assert json.loads(invoke(runner, "info", "--demo", "--json").output) == json.loads(
        invoke(runner, "info", "--json", path).output)
    readme = (Path(cli_module.__file__).resolve().parents[1] / "README.md").read_text()
    parameters = json.loads(invoke(runner, "info", "--demo", "--json").output)["parameters"].split(" ")[0]
    assert f"`rwkv-chat info --demo` counts {parameters} parameters" in " ".join(readme.split())


def test_an_empty_strategy_is_a_usage_error_and_an_empty_variable_is_unset(runner, model_path, monkeypatch):
    result = runner.invoke(cli, ["generate", "-m", str(model_path), "-s", " ", "-n", "1", "Hi"])
    assert result.exit_code == 2 and "the strategy is empty" in result.output
    monkeypatch.setenv("RWKV_CHAT_STRATEGY", "")
    assert invoke(runner, "generate", "-m", model_path, "-n", "1", "Hi").exit_code == 0


@pytest.mark.parametrize("how", ["flag", "env", "demo"])
def test_bench_takes_the_model_like_the_other_commands(runner, model_path, monkeypatch, how):
    seen = {}

    def fake_bench(path, strategy, *args):
        seen["path"], seen["strategy"] = str(path), strategy
        raise SystemExit(0)

    import rwkv_chat.benchmark as benchmark

    monkeypatch.setattr(benchmark, "bench_ours", fake_bench)
    monkeypatch.setattr(demo_module, "demo_model_path", lambda: "/demo/rwkv7-demo.pth")
    args = {"flag": ["-m", str(model_path), "-s", "cpu bf16"], "env": [], "demo": ["--demo", "-m", str(model_path)]}[how]
    env = {"RWKV_CHAT_MODEL": str(model_path), "RWKV_CHAT_STRATEGY": "cpu bf16"} if how == "env" else {}
    runner.invoke(cli, ["bench", *args], env=env)
    assert seen["path"] == ("/demo/rwkv7-demo.pth" if how == "demo" else str(model_path))
    assert seen["strategy"] == ("cpu fp32" if how == "demo" else "cpu bf16")


def test_readme_snapshot_example_matches_real_names(user_home):
    from pathlib import Path

    from rwkv_chat.chat.snapshot import default_snapshot_path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    examples = re.findall(r"snapshots/(\S+\.rwkvchat)", readme)
    assert examples
    real = default_snapshot_path().name
    pattern = re.sub(r"\d", r"\\d", re.escape(real))
    for name in examples:
        assert re.fullmatch(pattern, name), (name, real)
