"""The Textual app. `make_app(session, ...)` is the one way the CLI and the tests build it."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding

from ..config import Config, default_config_path
from .keys import DEFAULT_KEYS
from .prefs import load_prefs, save_prefs
from .screens.chat import ChatScreen
from .widgets.state_files import StateChoice

QUIT_WAIT_S = 3.0  # how long quitting waits for a stopped reply to settle (it is stored then)


class ChatApp(App):
    """Chat with one ChatSession. The screen does the work; the app holds the config, the keymap,
    the theme and the commands of the command palette."""

    CSS_PATH = "app.tcss"
    TITLE = "rwkv-chat"
    BINDINGS = [Binding(DEFAULT_KEYS["quit"], "quit", "Quit", id="quit", priority=True)]

    def __init__(self, session, *, config: Config, model_label: str, demo_note: str | None,
                 welcome: str | None, state_choices: Callable[[], list[StateChoice]],
                 state_folders: list[Path]) -> None:
        super().__init__()
        self.session = session
        self.config = config
        self.keys = dict(config.keys)
        self.config_path = config.source or default_config_path()
        self._screen_args = {"model_label": model_label, "demo_note": demo_note, "welcome": welcome,
                             "state_choices": state_choices, "state_folders": state_folders}

    def get_default_screen(self) -> ChatScreen:
        return ChatScreen(self.session, **self._screen_args)

    def on_mount(self) -> None:
        # only the remapped ids: Textual's keymap treats a binding "remapped" to its own key as a clash
        self.set_keymap({key_id: keys for key_id, keys in self.keys.items() if keys != DEFAULT_KEYS.get(key_id)})
        picked = load_prefs().get("theme")  # the last theme picked in the palette wins over the config's
        if isinstance(picked, str) and picked in self.available_themes:
            self.theme = picked
        elif self.config.theme in self.available_themes:
            self.theme = self.config.theme
        else:
            self.notify(f"Unknown theme {self.config.theme!r}; using {self.theme}.", severity="warning")
        self._theme_loaded = True

    def watch_theme(self, theme: str) -> None:
        """Remember a theme picked in the palette (written atomically to prefs.json, in a thread)."""
        if getattr(self, "_theme_loaded", False):
            self.remember_theme(theme)

    @work(thread=True, exclusive=True, group="prefs", exit_on_error=False)
    def remember_theme(self, theme: str) -> None:
        if load_prefs().get("theme") == theme:
            return
        try:
            save_prefs({"theme": theme})
        except OSError as error:
            self.call_from_thread(self.notify, f"Could not remember the theme: {error}", severity="warning")

    def get_system_commands(self, screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = self.screen_stack[0]
        if not isinstance(chat, ChatScreen):
            return
        commands = [
            ("New conversation", "Start over from the starting state", chat.action_new_conversation),
            ("Save snapshot", "Export this conversation to a .rwkvchat file", chat.action_save_snapshot),
            ("Conversations", "Open, rename, delete, search or export kept conversations", chat.action_open_snapshot),
            ("Regenerate", "Generate the last reply again", chat.action_regenerate),
            ("Continue", "Generate more of the last reply", chat.action_continue_reply),
            ("Edit last message", "Change the last message and send it again", chat.action_edit_last),
            ("Toggle side panes", "Show or hide the settings and state-file panes", chat.action_toggle_panes),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)
        for choice in chat.listed_state_files or []:  # listed by a worker when the screen opened
            if choice.fits:
                yield SystemCommand(f"Load state file: {choice.info.name}",
                                    f"New conversation from {choice.info.path}",
                                    lambda path=choice.info.path: chat.load_state_file(path))

    async def action_quit(self) -> None:
        """Quit, ending a running reply first (the worker stops after the current token)."""
        self.session.stop()
        self.exit()

    def on_unmount(self) -> None:
        self.session.stop()
        deadline = time.monotonic() + QUIT_WAIT_S
        while self.session.busy and time.monotonic() < deadline:  # the stopped reply settles and is kept
            time.sleep(0.01)
        close = getattr(self.session, "close", None)
        if close is not None:
            close()  # what is waiting to be stored is written before the process ends


def default_state_choices(shape, folders: list[Path] | None = None) -> Callable[[], list[StateChoice]]:
    """A function listing the tuned state files (bundled and the user's) against `shape`."""
    from ..chat.state_files import list_state_files

    def choices() -> list[StateChoice]:
        return [StateChoice.of(info, shape) for info in list_state_files(folders)]

    return choices


def make_app(session, *, config: Config | None = None, demo_note: str | None = None,
             model_label: str | None = None, welcome: str | None = None,
             state_folders: list[Path] | None = None) -> ChatApp:
    """The chat app for `session` (a ChatSession). `demo_note` is shown under the status line
    (the CLI uses it to mark the built-in demo model), `welcome` in an empty conversation,
    `model_label` instead of the checkpoint's file name; `state_folders` replaces the default
    state-file folders (tests)."""
    from ..chat import locations

    model = session.model
    folders = list(state_folders) if state_folders is not None else locations.state_dirs()
    return ChatApp(
        session,
        config=config or Config(),
        model_label=model_label or Path(model.path).name,
        demo_note=demo_note,
        welcome=welcome,
        state_choices=default_state_choices(model.shape, state_folders),
        state_folders=folders,
    )
