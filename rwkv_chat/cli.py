"""The `rwkv-chat` command: with no subcommand it opens the chat; `generate` and `info` serve scripts.

torch and textual are imported inside the commands, so `rwkv-chat --help` answers at once.
Add a subcommand with `@cli.command()`; `model_options` gives it --model/--strategy/--demo,
and `load_model` loads with a progress bar. Every failure becomes one line `Error: ...` on
stderr (RWKVChatGroup, once for all commands): exit status 2 for bad input (`RWKVChatError`,
`OSError`), 1 for a bug; `--debug` shows the traceback.
"""
from __future__ import annotations

import enum
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .demo import LABEL as DEMO_LABEL
from .errors import ModelLoadError, RWKVChatError

DEBUG_KEY = "rwkv_chat.debug"
GROUP_CONFIG_KEY = "rwkv_chat.config"  # `rwkv-chat --config FILE <command>`: the command reads FILE
SNAPSHOT_SUFFIX = ".rwkvchat"
DEMO_STATUS = "Tiny demo model (it knows nothing). For real answers: rwkv-chat --model PATH.pth"


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # an unexpected error (a bug): one line, --debug prints the traceback
    BAD_INPUT = 2  # a file, strategy, device or option that cannot be used (click uses 2 for usage errors too)
    INTERRUPTED = 130  # Ctrl+C
    PIPE_CLOSED = 141  # the reader of stdout went away (`| head`): quiet, as a process killed by SIGPIPE


class InputError(RWKVChatError, ValueError):
    """Input a command cannot use (a prompt that is not UTF-8 text, ...): one line, exit 2."""


def error_line(error: BaseException) -> str:
    """One line for any failure: our errors' own messages, the file and the system's reason for
    an OSError, the exception type for anything unexpected."""
    from .files import display_path

    if isinstance(error, RWKVChatError):
        text = str(error)
    elif isinstance(error, OSError) and error.filename is not None:
        text = f"{display_path(error.filename)}: {error.strerror or error}"
        if error.filename2 is not None:
            text += f" ({display_path(error.filename2)})"
    elif isinstance(error, OSError):
        text = error.strerror or str(error) or type(error).__name__
    elif isinstance(error, MemoryError):
        text = "not enough memory" + (f" ({error})" if str(error) else "")
    else:
        text = f"unexpected {type(error).__name__}: {error} (a bug in rwkv-chat; --debug shows the traceback)"
    text = " ".join(text.split())  # tracebacks of C libraries, compiler logs: keep it one line
    return text if len(text) <= 1000 else text[:997] + "..."


class RWKVChatGroup(click.Group):
    """Every failure reaching the CLI, from any command, becomes one line `Error: ...` on stderr:
    exit 2 for bad input (RWKVChatError, OSError such as a name too long, MemoryError), exit 1
    for an unexpected exception (a bug). `--debug` re-raises instead, showing the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints these itself (usage errors, --help, --version)
        except KeyboardInterrupt:
            if ctx.meta.get(DEBUG_KEY):
                raise
            click.echo("Interrupted.", err=True)
            ctx.exit(ExitCode.INTERRUPTED)
        except BrokenPipeError:
            _silence_stdout()
            ctx.exit(ExitCode.PIPE_CLOSED)
        except Exception as error:
            if ctx.meta.get(DEBUG_KEY):
                raise
            expected = isinstance(error, (RWKVChatError, OSError, MemoryError))
            click.echo(f"Error: {error_line(error)}", err=True)
            ctx.exit(ExitCode.BAD_INPUT if expected else ExitCode.FAILED)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _set_debug(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.meta[DEBUG_KEY] = True


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show full tracebacks instead of one-line errors.",
)
config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Config file to read instead of config.toml in the user config dir.",
)


def _strategy_given(ctx: click.Context, param: click.Parameter, strategy: str | None) -> str | None:
    if strategy is not None and not strategy.strip():  # an empty RWKV_CHAT_STRATEGY reads as unset
        raise click.BadParameter("the strategy is empty; give one such as 'cpu fp32', or leave it out for the "
                                 "default", ctx, param)
    return strategy


def model_options(command):
    """--model, --strategy and --demo, shared by every command that loads a model."""
    options = [
        click.option("--model", "-m", "model_path", type=click.Path(path_type=Path), envvar="RWKV_CHAT_MODEL",
                     help="RWKV checkpoint (.pth; the suffix may be left out). Default: [model] path in the "
                          "config file, else the built-in demo model. Env: RWKV_CHAT_MODEL."),
        click.option("--strategy", "-s", envvar="RWKV_CHAT_STRATEGY", callback=_strategy_given,
                     help="Where and how to run the layers, e.g. 'cpu fp32', 'cpu bf16i8', 'cuda fp16', "
                          "'cuda fp16i8 *10 -> cpu fp32'. DTYPE fp32/fp16/bf16, plus i8 or i4 for int8 / "
                          "int4 weights (a scale per 32 weights; i4 is smaller and less accurate; CPU i8a8 "
                          "also rounds the products' inputs to int8, for faster batches). Default: "
                          "cuda fp16 when CUDA is present, else cpu fp32. Env: RWKV_CHAT_STRATEGY."),
        click.option("--demo", is_flag=True, help="Use the built-in tiny demo model (ignores --model)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# ---------------------------------------------------------------------------------------------
# Shared helpers (heavy imports inside)


@functools.cache
def default_strategy() -> str:
    import torch

    return "cuda fp16" if torch.cuda.is_available() else "cpu fp32"


def demo_model() -> tuple[Path, str]:
    """(path, note) of the built-in demo model, or ModelLoadError telling the user to pass --model."""
    try:
        from .demo import DEMO_MODEL_NOTE, demo_model_path, trained_token_count

        path = Path(demo_model_path())
        facts = describe_file(path)  # the numbers `rwkv-chat info` prints for it
        parameters = facts["parameters"].split(" ")[0]
        note = (f"Built-in demo model: a tiny RWKV-{facts['version']} ({facts['layers']} layers, {facts['width']} "
                f"wide, heads {facts['heads']}; {parameters} parameters, vocabulary {facts['vocab']:,} tokens, "
                f"trained on {trained_token_count():,} of them). ")
        return path, note + DEMO_MODEL_NOTE
    except (ImportError, OSError, ValueError, RWKVChatError) as error:
        raise ModelLoadError(
            f"no model given and the built-in demo model is not available ({error}); "
            "pass --model PATH to an RWKV .pth checkpoint"
        ) from error


def choose_model(model_path: Path | None, demo: bool, config) -> tuple[Path, str | None]:
    """(checkpoint path, demo note or None): --demo, else --model, else the config's, else the demo."""
    if not demo:
        path = model_path or config.model
        if path is not None:
            return path, (demo_model()[1] if is_demo_model(path) else None)
    return demo_model()


def is_demo_model(path: Path) -> bool:
    """Whether `path` is the expanded built-in demo model (e.g. named by a snapshot)."""
    from .demo import EXPANDED_PREFIX, demo_model_path

    if not Path(path).name.startswith(EXPANDED_PREFIX):
        return False
    try:
        return Path(path).resolve() == Path(demo_model_path()).resolve()
    except (OSError, RWKVChatError):
        return False


def command_config(config_path: Path | None):
    """The config for a subcommand: its own --config, else the group's (`rwkv-chat --config F cmd`)."""
    from .config import load_config

    if config_path is None:
        context = click.get_current_context(silent=True)
        config_path = context.meta.get(GROUP_CONFIG_KEY) if context is not None else None
    return load_config(config_path)


def load_model(path: Path, strategy: str):
    """RWKV(path, strategy) with a rich progress bar on stderr (shown only on a terminal), after
    saying so when the CPU kernels are compiled first (once per machine, seconds)."""
    from . import RWKV
    from .progress import terminal_bar, terminal_status

    if "cpu" in strategy.lower():
        from .engine import cpu_kernels

        if not cpu_kernels.ready():
            with terminal_status("Compiling the CPU kernels for this machine (once; about 10 s)"):
                cpu_kernels.get()
    with terminal_bar(path, f"Reading and checking {Path(path).name} (strategy {strategy})") as progress:
        return RWKV(path, strategy, progress=progress)


def sampling_overrides(**values) -> dict[str, Any]:
    """The sampling flags that were given (None means not given)."""
    return {name: value for name, value in values.items() if value is not None}


# ---------------------------------------------------------------------------------------------
# The root group: `rwkv-chat` opens the chat


@click.group(cls=RWKVChatGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Start from a tuned state file (RWKV-PEFT state tuning).")
@click.option("--snapshot", "snapshot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Resume a saved conversation (.rwkvchat). Without --model, its own model is used.")
@click.option("--continue", "-c", "continue_last", is_flag=True,
              help="Reopen the most recent conversation from the history (with its own model unless --model).")
@config_option
@click.version_option(__version__, "--version", "-V", prog_name="rwkv-chat")
@debug_option
@click.pass_context
def cli(ctx: click.Context, model_path, strategy, demo, state_path, snapshot_path, continue_last, config_path) -> None:
    """Chat with a local RWKV model (v4, v5.2, v6, v7) in the terminal.

    With no command, opens the chat. Enter sends, Ctrl+J adds a new line, Esc stops a reply,
    Ctrl+O lists the kept conversations, F1 lists every key. Every conversation is kept as it
    happens (`rwkv-chat history` lists them). Keys, default model and sampling values can be
    set in config.toml in the user config dir (see --config).

    \b
    Examples:
      rwkv-chat                                   # the tiny built-in demo model
      rwkv-chat -c                                # reopen the most recent conversation
      rwkv-chat -m ~/models/RWKV-x070-World-1.5B-v3.pth
      rwkv-chat -m model.pth -s "cuda fp16i8 *12 -> cpu fp32"
      rwkv-chat -m model.pth --state states/chinese-chat.pth
      rwkv-chat --snapshot ~/.local/share/rwkv-chat/snapshots/2024-05-01_12-00-00.rwkvchat
      rwkv-chat generate -m model.pth "The capital of France is"
      rwkv-chat info model.pth
    """
    if ctx.invoked_subcommand is not None:
        ctx.meta[GROUP_CONFIG_KEY] = config_path
        return
    run_chat(model_path=model_path, strategy=strategy, demo=demo, state_path=state_path,
             snapshot_path=snapshot_path, config_path=config_path, continue_last=continue_last)


def run_chat(*, model_path, strategy, demo, state_path, snapshot_path, config_path, continue_last=False) -> None:
    from .config import load_config
    from .chat.store import ConversationStore

    if sum(option is not None and option is not False for option in (state_path, snapshot_path, continue_last)) > 1:
        raise click.UsageError("--state, --snapshot and --continue cannot be combined "
                               "(a saved conversation remembers its own state file)")
    config = load_config(config_path)
    store = ConversationStore()
    continue_id = None
    if continue_last:
        latest = store.most_recent()
        if latest is None:
            raise click.ClickException("there is no conversation to continue yet; start one with rwkv-chat")
        continue_id = latest.id
        snapshot_path = store.load(continue_id)[0].path
    if snapshot_path is not None and model_path is None and not demo:
        model_path = snapshot_model_path(snapshot_path)
        demo = model_path is None
    path, demo_note = choose_model(model_path, demo, config)
    strategy = strategy or config.strategy or default_strategy()
    model = load_model(path, strategy)
    if continue_id is not None:
        from . import Pipeline
        from .chat.session import ChatSession

        session = ChatSession.from_store(Pipeline(model), store, continue_id)
    else:
        session = make_session(model, config, state_path=state_path, snapshot_path=snapshot_path)
        session.attach_store(store)

    from .tui.app import make_app

    demo = demo_note is not None
    app = make_app(session, config=config, demo_note=DEMO_STATUS if demo else None,
                   model_label=DEMO_LABEL if demo else None, welcome=demo_note)
    app.run()


def snapshot_model_path(snapshot_path: Path) -> Path | None:
    """The model a snapshot was saved with (None: the built-in demo model); ModelLoadError when
    that file is gone."""
    from .chat.snapshot import read_snapshot_data
    from .demo import EXPANDED_PREFIX
    from .engine.state import ModelShape

    model = read_snapshot_data(snapshot_path)["model"]
    path = Path(model.get("path") or "")
    if str(model.get("name", "")).startswith(EXPANDED_PREFIX):
        return None  # the built-in demo model (its cached file may have moved or been renamed)
    if not model.get("path") or not path.is_file():
        shape = ModelShape.from_dict(model["shape"]).describe()
        raise ModelLoadError(
            f"{snapshot_path}: was saved with {model.get('path') or 'an unknown model'}, which is not there any "
            f"more; pass --model PATH to a model of the same shape ({shape})"
        )
    return path


def make_session(model, config, *, state_path: Path | None = None, snapshot_path: Path | None = None):
    """A ChatSession for `model` with the config's names and sampling, started from a state file
    or a snapshot when given."""
    from . import Pipeline
    from .chat.session import ChatSession
    from .sampling import SamplingSettings

    pipeline = Pipeline(model)
    if snapshot_path is not None:
        return ChatSession.open(pipeline, snapshot_path)
    return ChatSession(pipeline, SamplingSettings.from_dict(config.sampling), user=config.user,
                       assistant=config.assistant, preamble=config.preamble, state_file=state_path)


# ---------------------------------------------------------------------------------------------
# generate


def sampling_options(command):
    options = [
        click.option("--temperature", "-t", type=float, help="Temperature; 0 picks the likeliest token. Default 1.0."),
        click.option("--top-p", type=float, help="Keep the likeliest tokens up to this probability mass. Default 0.3."),
        click.option("--top-k", type=int, help="Keep at most this many tokens; 0 turns it off. Default 0."),
        click.option("--presence", type=float, help="Presence penalty for tokens already generated. Default 0.5."),
        click.option("--frequency", type=float, help="Frequency penalty per earlier occurrence. Default 0.5."),
        click.option("--penalty-decay", type=float, help="Per-token decay of the repetition counts. Default 0.996."),
        click.option("--max-tokens", "-n", type=int, help="Stop after this many tokens. Default 256."),
        click.option("--seed", type=int, help="Seed for reproducible output."),
        click.option("--stop", multiple=True, help="Stop at this text (repeatable); it is not printed."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@model_options
@click.argument("prompt", required=False)
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Start from a tuned state file.")
@sampling_options
@click.option("--chat", "chat_format", is_flag=True,
              help="Wrap the prompt as 'User: PROMPT\\n\\nAssistant:' and stop at the end of the reply.")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr at the end.")
@config_option
@debug_option
def generate(model_path, strategy, demo, prompt, state_path, chat_format, stats, config_path, stop, **sampling) -> None:
    """Continue PROMPT with the model and stream the text to stdout.

    PROMPT is read from stdin when it is '-' or left out. Sampling defaults are the chat
    defaults (and the config file's [sampling] values); the flags override them.

    \b
    Examples:
      rwkv-chat generate -m model.pth "The capital of France is"
      rwkv-chat generate -m model.pth --temperature 0 -n 50 "def fib(n):"
      rwkv-chat generate -m model.pth --chat "Write a haiku about rain."
      echo "Once upon a time" | rwkv-chat generate -m model.pth --seed 1 --stats
      rwkv-chat generate -m model.pth --state states/poet.pth "Roses"
    """
    from .sampling import SamplingSettings

    if prompt is None or prompt == "-":
        if sys.stdin.isatty() and prompt is None:
            raise click.UsageError("give a PROMPT argument, or pipe the prompt on stdin")
        prompt = read_prompt_from_stdin()
    else:
        check_utf8(prompt, "the PROMPT argument")
    if not prompt:
        raise click.UsageError("the prompt is empty")
    if chat_format:
        from .chat.template import TURN_END, clean_user_message, turn_prompt

        try:
            prompt = turn_prompt(clean_user_message(prompt))
        except ValueError as error:
            raise click.UsageError(f"the prompt is empty ({error})") from None
        stop = (*stop, TURN_END)

    config = command_config(config_path)
    try:
        settings = SamplingSettings.from_dict({**config.sampling, **sampling_overrides(**sampling)})
        if stop:
            settings = settings.replace(stop=tuple(stop))
    except ValueError as error:
        raise click.BadParameter(str(error)) from error

    path, _note = choose_model(model_path, demo, config)
    model = load_model(path, strategy or config.strategy or default_strategy())
    state = model.load_state(state_path) if state_path else None

    from . import Pipeline

    generation = Pipeline(model).stream(prompt, state=state, settings=settings)
    started = not chat_format  # a chat reply starts after "Assistant:": drop its leading space
    for piece in generation:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats:
        s = generation.stats
        first = "-" if s.time_to_first_token is None else f"{s.time_to_first_token:.2f}s"
        click.echo(
            f"{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated in {s.seconds:.2f}s "
            f"({s.tokens_per_second:.1f} tok/s, first token after {first}), finish: {generation.finish_reason}",
            err=True,
        )


def _serve_host(ctx: click.Context, param: click.Parameter, host: str) -> str:
    from .serve.server import ServeOptionError, check_host

    try:
        check_host(host)
    except ServeOptionError as error:
        raise click.BadParameter(str(error), ctx, param) from None
    return host


def _serve_api_key(ctx: click.Context, param: click.Parameter, api_key: str | None) -> str | None:
    from .serve.server import ServeOptionError, check_api_key

    if api_key is None and os.environ.get(param.envvar) == "":  # click reads an empty variable as unset
        raise click.BadParameter(f"{param.envvar} is set but empty, which would let every client in; set a key, "
                                 "or unset it to serve without one", ctx, param)
    if api_key is not None:
        try:
            check_api_key(api_key)
        except ServeOptionError as error:
            raise click.BadParameter(str(error), ctx, param) from None
    return api_key


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, callback=_serve_host,
              help="Address to listen on (0.0.0.0 serves other machines: set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--state", "state_paths", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A tuned state file clients may start from (model 'NAME:STATE' or a 'state' field); repeatable.")
@click.option("--api-key", envvar="RWKV_CHAT_API_KEY", callback=_serve_api_key,
              help="Require 'Authorization: Bearer KEY' (printable ASCII). Env: RWKV_CHAT_API_KEY.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Requests decoded together in one batch; more wait in the queue.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Requests that may wait for a batch slot; beyond that: 429 with Retry-After.")
@click.option("--max-tokens", default=4096, show_default=True, type=click.IntRange(1),
              help="The most tokens one request may generate.")
@click.option("--cache-mb", default=512, show_default=True, type=click.IntRange(0),
              help="Memory for cached conversation states (LRU).")
@click.option("--timeout", "request_timeout", default=600, show_default=True, type=click.IntRange(1),
              help="Seconds a request may take (queueing included); then it ends with finish_reason 'length'.")
@config_option
@debug_option
def serve(model_path, strategy, demo, host, port, state_paths, api_key, max_batch, max_queue, max_tokens, cache_mb,
          request_timeout, config_path) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, models).

    Requests decode together in one batch (the weights are read once per step for all), and
    the state after each conversation prefix is cached, so a client that resends the whole
    history each turn only pays for the new part. See docs/serving.md.

    Clients name the model by its file name without .pth ("rwkv-demo" for the demo model), or
    "NAME:STATE" for a tuned state; GET /v1/models lists the names.

    \b
    Examples:
      rwkv-chat serve                                   # the tiny demo model on 127.0.0.1:8000
      curl http://127.0.0.1:8000/v1/models              # its names: rwkv-demo
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"model": "rwkv-demo", "messages": [{"role": "user", "content": "Hi"}]}'
      rwkv-chat serve -m model.pth -s "cpu bf16i8" --port 8080          # serves "model"
      rwkv-chat serve -m model.pth --state states/poet.pth --api-key secret   # and "model:poet"
    """
    from .serve.api import Limits
    from .serve.server import HttpServer, base_url, build_service, listen
    from .tokenizer import Tokenizer

    sockets = listen(host, port)  # before the model loads: a busy port fails at once, and stays ours
    try:
        config = command_config(config_path)
        path, demo_note = choose_model(model_path, demo, config)
        model = load_model(path, strategy or config.strategy or default_strategy())
        model_id = "rwkv-demo" if demo_note is not None else Path(path).stem
        limits = Limits(max_tokens=max_tokens, default_max_tokens=min(512, max_tokens))
        service = build_service(model, Tokenizer(), model_id=model_id, state_paths=state_paths, api_key=api_key,
                                limits=limits, max_batch=max_batch, max_queue=max_queue,
                                cache_bytes=cache_mb << 20, timeout=request_timeout)
        port = sockets[0].getsockname()[1]  # the one chosen for --port 0
        names = ", ".join([model_id] + [f"{model_id}:{name}" for name in service.states])
        click.echo(f"Serving {names} on {base_url(host, port)} (strategy {model.strategy}"
                   f"{'; API key required' if service.api_key else ''}). Ctrl+C stops.", err=True)
        HttpServer(service, host, port, grace=5.0).run(sockets)
    finally:
        for sock in sockets:
            sock.close()


MAX_STDIN_PROMPT = 16 << 20  # bytes; more is not a prompt (e.g. `< /dev/zero` would never end)


def read_prompt_from_stdin() -> str:
    """stdin as UTF-8 text; InputError for binary data or more than MAX_STDIN_PROMPT bytes."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stdin (embedding): already decoded
        text = sys.stdin.read(MAX_STDIN_PROMPT + 1)
        check_utf8(text, "stdin")
        data_length = len(text)
    else:
        data = stream.read(MAX_STDIN_PROMPT + 1)
        data_length = len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"stdin is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                             "the prompt must be text, not binary data") from None
    if data_length > MAX_STDIN_PROMPT:
        raise InputError(f"stdin holds more than {MAX_STDIN_PROMPT >> 20} MB; too long for a prompt")
    return text


def check_utf8(text: str, what: str) -> None:
    """InputError when `text` holds bytes that were not UTF-8 (Python keeps them as lone
    surrogates when it decodes command-line arguments)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character U+{ord(bad):04X}"
        raise InputError(f"{what} is not valid UTF-8 text ({byte} at character {error.start})") from None


# ---------------------------------------------------------------------------------------------
# info


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file.")
@click.option("--paths", "show_paths", is_flag=True,
              help="Print the user folders (snapshots, state files, config) instead of describing files.")
@click.option("--demo", is_flag=True, help="Describe the built-in demo model (with any files given).")
@debug_option
def info(paths, as_json, show_paths, demo) -> None:
    """Describe checkpoints, tuned state files and saved conversations without loading a model.

    For a model: version, layers, width, heads, vocabulary, parameters, dtype. For a state
    file: layers, heads and width it fits. For a snapshot (.rwkvchat): model, date, messages.
    With --paths: where rwkv-chat keeps your files.

    \b
    Examples:
      rwkv-chat info ~/models/RWKV-x070-World-1.5B-v3.pth
      rwkv-chat info states/*.pth
      rwkv-chat info --json conversation.rwkvchat
      rwkv-chat info --demo
      rwkv-chat info --paths
    """
    if show_paths:
        folders = user_paths()
        if as_json:
            click.echo(json.dumps(folders))
        else:
            width = max(len(key) for key in folders)
            for key, value in folders.items():
                click.echo(f"{key.replace('_', ' '):<{width}}  {value}")
        return
    if demo:
        from .demo import demo_model_path

        paths = (demo_model_path(), *paths)
    if not paths:
        raise click.UsageError("give one or more files to describe, or --demo, or --paths")
    for index, path in enumerate(paths):
        facts = describe_file(path)
        if as_json:
            click.echo(json.dumps(facts, default=str))
            continue
        if index:
            click.echo()
        width = max(len(key) for key in facts)
        for key, value in facts.items():
            click.echo(f"{key.replace('_', ' '):<{width}}  {value}")


def user_paths() -> dict[str, str]:
    """Where rwkv-chat keeps the user's files (RWKV_CHAT_HOME moves them all)."""
    from .chat import locations
    from .config import default_config_path

    return {
        "snapshots": str(locations.snapshots_dir()),
        "user_states": str(locations.user_states_dir()),
        "bundled_states": ", ".join(str(folder) for folder in locations.bundled_states_dirs()) or "-",
        "config_file": str(default_config_path()),
        "data_folder": str(locations.data_dir()),
    }


def describe_file(path: Path) -> dict[str, Any]:
    """Facts about a checkpoint, tuned state file or snapshot, read without building a model;
    counts and sizes written for people."""
    from .chat import snapshot
    from .engine import loader
    from .errors import SnapshotError

    if path.suffix == SNAPSHOT_SUFFIX:
        facts = snapshot.describe(path)
    elif _is_safetensors(path):
        try:
            facts = snapshot.describe(path)
        except SnapshotError:  # safetensors weights, which `generate -m` loads as a model too
            facts = loader.describe(path)
    else:
        facts = loader.describe(path)
    if "parameters" in facts:
        facts["parameters"] = _count(facts["parameters"])
    facts["size"] = _size(facts["size"])
    return facts


# ---------------------------------------------------------------------------------------------
# history


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per conversation.")
@click.option("--search", "-s", help="Only conversations whose title or messages contain this text.")
@debug_option
@click.pass_context
def history(ctx: click.Context, as_json, search) -> None:
    """List the kept conversations, newest first (id, date, messages, model, title).

    Every conversation in the chat is kept as it happens. Ids may be shortened to any unique
    prefix in the commands below.

    \b
    Examples:
      rwkv-chat history                       # list them
      rwkv-chat history -s haiku --json       # those mentioning "haiku", as JSON lines
      rwkv-chat history export 3f2a chat.md   # Markdown (or .rwkvchat to share it)
      rwkv-chat history import chat.rwkvchat  # keep a shared conversation
      rwkv-chat history delete 3f2a
      rwkv-chat -c                            # reopen the most recent one in the chat
    """
    if ctx.invoked_subcommand is not None:
        return
    from .chat.store import ConversationStore

    store = ConversationStore()
    if store.problem:
        click.echo(f"Note: {store.problem}", err=True)
    infos = store.list(search)
    for info in infos:
        if as_json:
            click.echo(json.dumps(info.to_dict(), ensure_ascii=False))
            continue
        when = info.updated.strftime("%Y-%m-%d %H:%M") if info.updated else "-" * 16
        if info.problem:
            click.echo(f"{info.id[:8]}  {'unreadable':<16}  {info.problem}")
        else:
            click.echo(f"{info.id[:8]}  {when}  {info.n_messages:>3} msgs  {info.model_label}  {info.title}")
    if not infos and not as_json:
        click.echo("No conversations match." if search else "No conversations yet.", err=True)


@history.command("export")
@click.argument("conversation_id")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@debug_option
def history_export(conversation_id, file) -> None:
    """Write a conversation to FILE: Markdown for .md, else a shareable .rwkvchat snapshot.

    An existing FILE is never replaced: a free name (FILE-2, ...) is used and printed.

    \b
    Examples:
      rwkv-chat history export 3f2a chat.md
      rwkv-chat history export 3f2a chat.rwkvchat
    """
    from .chat.store import ConversationStore
    from .files import write_new_file

    store = ConversationStore()
    conversation_id = store.resolve(conversation_id)
    if file.suffix.lower() in (".md", ".markdown"):
        text = store.markdown(conversation_id)
        try:
            written = write_new_file(file, lambda temp: temp.write_text(text, encoding="utf-8"))
        except OSError as error:
            raise click.ClickException(f"{file}: cannot write ({error.strerror or error})") from error
    else:
        written = store.export_snapshot(conversation_id, file)
    click.echo(str(written))


@history.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@debug_option
def history_import(file) -> None:
    """Keep a .rwkvchat snapshot FILE as a new conversation in the history; prints its id.

    \b
    Examples:
      rwkv-chat history import shared.rwkvchat
    """
    from .chat.store import ConversationStore

    click.echo(ConversationStore().import_snapshot(file))


@history.command("delete")
@click.argument("conversation_id")
@click.option("--yes", "-y", is_flag=True, help="delete without asking (for scripts)")
@debug_option
def history_delete(conversation_id, yes) -> None:
    """Delete a conversation (its messages and state) from the history, after asking.

    \b
    Examples:
      rwkv-chat history delete 3f2a
      rwkv-chat history delete 3f2a --yes
    """
    from .chat.store import ConversationStore

    store = ConversationStore()
    try:
        conversation_id = store.resolve(conversation_id)
        info = next((i for i in store.list() if i.id == conversation_id), None)
        about = f"{conversation_id[:8]} {info.title!r} ({info.n_messages} messages)" if info else conversation_id
        store.hold(conversation_id)  # refused now, not after asking, when it is open in another window
        if not yes:
            click.confirm(f"Delete {about}?", abort=True, err=True)
        store.delete(conversation_id)
    finally:
        store.close()
    click.echo(f"Deleted {about}")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then '{'."""
    from .files import regular_file_problem

    if regular_file_problem(path) is not None:
        return False  # never open a FIFO (it would block) or a device
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit} ({n:,})"
    return f"{n:,}"


def _size(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _register_bench() -> None:
    from .benchmark import bench  # click and the standard library only; torch loads when it runs

    cli.add_command(bench)


_register_bench()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="rwkv-chat")


if __name__ == "__main__":
    main()
