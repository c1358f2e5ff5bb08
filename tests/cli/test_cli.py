"""The command line: help, generate, info, the chat command's wiring, errors and exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rwkv_chat import cli as cli_module
from rwkv_chat.cli import ExitCode, cli
from rwkv_chat.errors import ModelLoadError


def invoke(runner, *args, input=None):
    return runner.invoke(cli, list(map(str, args)), input=input, catch_exceptions=False)


# ------------------------------------------------------------------ help


@pytest.mark.parametrize("command", [[], ["generate"], ["info"]])
def test_every_help_has_examples(runner, command):
    result = invoke(runner, *command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "rwkv-chat" in result.output


def test_version(runner):
    result = invoke(runner, "--version")
    assert result.exit_code == 0 and "rwkv-chat, version" in result.output


def test_help_does_not_import_torch_or_textual():
    code = ("import sys; from click.testing import CliRunner; from rwkv_chat.cli import cli; "
            "CliRunner().invoke(cli, ['--help']); "
            "print(sorted(m for m in ('torch', 'textual') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ generate


def test_generate_streams_reproducibly_with_a_seed(runner, model_path):
    args = ["generate", "--model", model_path, "--seed", 3, "-n", 8, "Once upon a time"]
    first, second = invoke(runner, *args), invoke(runner, *args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.strip()


def test_generate_reads_stdin_and_prints_stats(runner, model_path):
    result = invoke(runner, "generate", "-m", model_path, "-n", 4, "--temperature", 0, "--stats", input="Hello")
    assert result.exit_code == 0
    assert "4 generated" in result.stderr and "tok/s" in result.stderr


def test_generate_greedy_matches_the_pipeline(runner, model_path):
    from rwkv_chat import RWKV, Pipeline

    expected, _ = Pipeline(RWKV(model_path, progress=None)).generate("Hi", temperature=0, max_tokens=6)
    result = invoke(runner, "generate", "-m", model_path, "-t", 0, "-n", 6, "Hi")
    assert result.stdout == expected + "\n"


def test_generate_chat_format_wraps_the_prompt_in_the_chat_template(runner, model_path):
    from rwkv_chat import RWKV, Pipeline

    expected, _ = Pipeline(RWKV(model_path, progress=None)).generate(
        "User: Hi\nthere\n\nAssistant:", temperature=0, max_tokens=6, stop=["\n\n"])
    result = invoke(runner, "generate", "-m", model_path, "--chat", "-t", 0, "-n", 6, " Hi\n\nthere ")
    assert result.stdout == expected.lstrip() + "\n"  # blank lines cannot end the user's turn early


def test_generate_with_a_state_file(runner, model_path, state_path):
    from rwkv_chat import RWKV, Pipeline

    model = RWKV(model_path, progress=None)
    expected, _ = Pipeline(model).generate("Hi", state=model.load_state(state_path), temperature=0, max_tokens=6)
    plain = invoke(runner, "generate", "-m", model_path, "-t", 0, "-n", 6, "Hi")
    tuned = invoke(runner, "generate", "-m", model_path, "--state", state_path, "-t", 0, "-n", 6, "Hi")
    assert tuned.exit_code == 0
    assert tuned.stdout == expected + "\n" and tuned.stdout != plain.stdout


def test_generate_chat_format_writes_the_assistant_turn(runner, model_path, monkeypatch):
    """--chat: the prompt goes in as a chat turn, the reply stops at a blank line (as well as at
    the user's stops) and loses the space after "Assistant:"."""
    from rwkv_chat import RWKV, Pipeline

    expected, _ = Pipeline(RWKV(model_path, progress=None)).generate(
        "User: Hi\n\nAssistant:", temperature=0, max_tokens=6, stop=("\n\n",))
    calls = []
    original = Pipeline.stream

    def spy(self, prompt, **options):
        calls.append((prompt, options["settings"].stop))
        return original(self, prompt, **options)

    monkeypatch.setattr(Pipeline, "stream", spy)
    chat = invoke(runner, "generate", "-m", model_path, "--chat", "--stop", "###", "-t", 0, "-n", 6, "  Hi \n")
    assert chat.exit_code == 0
    assert expected.lstrip() and chat.stdout == expected.lstrip() + "\n"
    assert calls == [("User: Hi\n\nAssistant:", ("###", "\n\n"))]


def test_generate_refuses_bad_sampling_values(runner, model_path):
    result = runner.invoke(cli, ["generate", "-m", str(model_path), "--top-p", "0", "Hi"])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "top_p must be" in result.output


def test_generate_uses_config_sampling(runner, model_path, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[sampling]\nmax_tokens = 3\ntemperature = 0\n")
    result = invoke(runner, "generate", "-m", model_path, "--config", config, "--stats", "Hi")
    assert "3 generated" in result.stderr


# ------------------------------------------------------------------ info


def test_info_on_a_model(runner, model_path):
    result = invoke(runner, "info", model_path)
    assert result.exit_code == 0
    lines = dict(line.split(None, 1) for line in result.output.splitlines() if line and " " in line)
    assert lines["version"].strip() == "7" and lines["layers"].strip() == "2"
    assert lines["width"].strip() == "64" and lines["vocab"].strip() == "65536"
    assert "1 x 64" in result.output and "float32" in result.output
    total = sum(t.numel() for t in torch.load(model_path, weights_only=True).values())
    assert f"{total:,}" in result.output


def test_info_on_a_state_file_and_json(runner, state_path):
    result = invoke(runner, "info", "--json", state_path)
    facts = json.loads(result.output)
    assert facts["kind"] == "tuned state file"
    assert (facts["layers"], facts["width"], facts["heads"]) == (2, 64, "1 x 64")


def test_info_on_a_snapshot(runner, snapshot_path):
    result = invoke(runner, "info", snapshot_path)
    assert result.exit_code == 0
    assert "saved conversation" in result.output and "What is RWKV?" in result.output
    assert "tiny-v7.pth" in result.output and "messages" in result.output


def test_info_on_several_files(runner, model_path, state_path):
    result = invoke(runner, "info", model_path, state_path)
    assert result.output.count("file ") == 2


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(("args", "message"), [
    (["info", "/no/such/file.pth"], "no such file"),
    (["generate", "-m", "/no/such/model.pth", "Hi"], "no such file"),
    (["generate", "-m", "MODEL", "-s", "gpu fp16", "Hi"], "cannot read segment"),
    (["-m", "MODEL", "-s", "cpu fp64"], "cannot read segment"),
])
def test_errors_are_one_line_with_status_2(runner, model_path, args, message):
    args = [str(model_path) if arg == "MODEL" else arg for arg in args]
    result = runner.invoke(cli, args)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_not_a_model(runner, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for bad in (path, text):
        result = runner.invoke(cli, ["info", str(bad)])
        assert result.exit_code == ExitCode.BAD_INPUT
        assert str(bad) in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device(runner, model_path):
    result = runner.invoke(cli, ["generate", "-m", str(model_path), "-s", "cuda fp16", "Hi"])
    assert result.exit_code == ExitCode.BAD_INPUT and "needs CUDA" in result.stderr


def test_debug_shows_the_traceback(runner):
    result = runner.invoke(cli, ["--debug", "info", "/no/such/file.pth"])
    assert isinstance(result.exception, ModelLoadError)
    result = runner.invoke(cli, ["info", "/no/such/file.pth", "--debug"])
    assert isinstance(result.exception, ModelLoadError)


def test_bad_config_file(runner, tmp_path, model_path):
    config = tmp_path / "c.toml"
    config.write_text("[keys]\nfly = 'f5'\n")
    result = runner.invoke(cli, ["generate", "-m", str(model_path), "--config", str(config), "Hi"])
    assert result.exit_code == ExitCode.BAD_INPUT and "unknown name(s) in [keys]: fly" in result.stderr


def test_no_model_and_no_demo_says_to_pass_model(runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "rwkv_chat.demo", None)  # import fails
    result = runner.invoke(cli, ["generate", "Hi"])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "demo model is not available" in result.stderr and "--model" in result.stderr


# ------------------------------------------------------------------ the chat command


def test_chat_opens_the_tui_with_the_model_and_state(runner, model_path, state_path, fake_app):
    result = invoke(runner, "--model", model_path, "--state", state_path)
    assert result.exit_code == 0
    (app,) = fake_app.made
    assert app.session.state_file == state_path
    assert app.session.model.path == model_path and app.session.model.strategy == "cpu fp32"
    assert app.options["demo_note"] is None


def test_chat_resumes_a_snapshot_with_its_own_model(runner, model_path, snapshot_path, fake_app):
    from rwkv_chat.chat.snapshot import read_snapshot_data

    result = invoke(runner, "--snapshot", snapshot_path)
    assert result.exit_code == 0
    (app,) = fake_app.made
    saved = read_snapshot_data(snapshot_path)["messages"]
    assert [m.text for m in app.session.messages] == [m["text"] for m in saved]
    assert app.session.model.path == model_path


def test_chat_without_model_uses_the_demo(runner, model_path, fake_app, monkeypatch):
    monkeypatch.setattr(cli_module, "demo_model", lambda: (model_path, "About the demo."))
    result = invoke(runner)
    assert result.exit_code == 0
    (app,) = fake_app.made
    assert "demo model" in app.options["demo_note"].lower() and "--model" in app.options["demo_note"]
    assert app.options["welcome"] == "About the demo."


def test_chat_config_sets_names_and_sampling(runner, model_path, fake_app, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{model_path}"\n[chat]\nuser = "Bob"\n[sampling]\ntop_p = 0.5\n')
    result = invoke(runner, "--config", config)
    assert result.exit_code == 0
    (app,) = fake_app.made
    assert app.session.user == "Bob" and app.session.settings.top_p == 0.5


def test_chat_refuses_state_and_snapshot_together(runner, model_path, state_path):
    result = runner.invoke(cli, ["-m", str(model_path), "--state", str(state_path), "--snapshot", "x.rwkvchat"])
    assert result.exit_code == 2 and "cannot be combined" in result.output


def test_bad_state_file_for_the_chat(runner, model_path, tmp_path, fake_app):
    from rwkv_chat.testing.checkpoints import make_state_file, save_checkpoint

    wrong = save_checkpoint(tmp_path / "wrong.pth", make_state_file("7", 3, 128))
    result = runner.invoke(cli, ["-m", str(model_path), "--state", str(wrong)])
    assert result.exit_code == ExitCode.BAD_INPUT and "wrong.pth" in result.stderr
