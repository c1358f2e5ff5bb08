"""The main screen: conversation, message box, settings and state-file panes, status line.

The screen owns the ChatSession calls. Everything that touches the model or the disk runs in
thread workers. Work that changes the session (a reply, a new conversation, a system prompt, a
state file, opening or saving a conversation) runs one job after another in the order the keys
were pressed (`SessionQueue`), so a new conversation asked for before an open never lands after
it. A reply's text reaches the screen as `ReplyText` messages, batched (at most ~10 a second), so
typing never lags.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer

from ...chat import drafts, locations
from ..keys import DEFAULT_KEYS, DESCRIPTIONS
from ..streaming import PieceBatcher
from ..widgets.conversation import Conversation
from ..widgets.prompt import PromptInput
from ..widgets.settings import SettingsPane
from ..widgets.state_files import StateChoice, StateFilesPane
from ..widgets.status import StatusInfo, StatusLine
from .help import HelpScreen, key_label
from .history import HistoryEntry, HistoryScreen
from .persona import PersonaDialog

NARROW_WIDTH = 100  # below this the side panes are hidden until toggled


@dataclass(frozen=True)
class Shown:
    """A message as the conversation pane draws it (a copy, safe to hand across threads)."""

    role: str
    text: str
    stats: object | None = None
    finish_reason: str | None = None

    @classmethod
    def of(cls, message) -> Shown:
        return cls(message.role, message.text, getattr(message, "stats", None), getattr(message, "finish_reason", None))


class SessionQueue:
    """Orders the session's jobs: `ticket()`, taken on the UI thread when a job is asked for,
    returns (the previous job's done event, this job's); the worker waits for the first and sets
    the second when it has finished (its screen update included)."""

    def __init__(self) -> None:
        self._last = threading.Event()
        self._last.set()

    def ticket(self) -> tuple[threading.Event, threading.Event]:
        previous, self._last = self._last, threading.Event()
        return previous, self._last


def _binding(binding_id: str, action: str, label: str, show: bool = True) -> Binding:
    # priority: the screen's keys win over the focused widget's (TextArea binds F6 and F7 itself)
    return Binding(DEFAULT_KEYS[binding_id], action, label, id=binding_id, show=show,
                   tooltip=DESCRIPTIONS[binding_id], priority=True)


class ChatScreen(Screen):
    """Chat with `session`. Every key is a binding with an id, so the config's [keys] remap it."""

    BINDINGS = [
        _binding("quit", "app.quit", "Quit"),  # first: the footer cuts from the right in a narrow terminal
        _binding("help", "help", "Help"),
        _binding("stop", "stop", "Stop"),
        _binding("regenerate", "regenerate", "Regen"),
        _binding("continue", "continue_reply", "Continue"),
        _binding("edit_last", "edit_last", "Edit last", show=False),
        _binding("new", "new_conversation", "New"),
        _binding("save", "save_snapshot", "Save"),
        _binding("open", "open_snapshot", "Open"),
        _binding("temperature_down", "nudge('temperature', -0.1)", "Temp-", show=False),
        _binding("temperature_up", "nudge('temperature', 0.1)", "Temp+", show=False),
        _binding("top_p_down", "nudge('top_p', -0.05)", "Top-p-", show=False),
        _binding("top_p_up", "nudge('top_p', 0.05)", "Top-p+", show=False),
        _binding("toggle_panes", "toggle_panes", "Panes"),
        _binding("state_files", "focus_pane('states')", "States", show=False),
        _binding("conversation", "focus_conversation", "Messages", show=False),
        _binding("persona", "edit_persona", "Persona", show=False),
        _binding("settings", "focus_pane('settings')", "Settings", show=False),
    ]

    @dataclass
    class ReplyStarted(Message):
        messages: list[Shown]

    @dataclass
    class ReplyText(Message):
        text: str

    @dataclass
    class ReplyEnded(Message):
        error: BaseException | None = None

    def __init__(self, session, *, model_label: str, state_choices: Callable[[], list[StateChoice]],
                 state_folders: list[Path], demo_note: str | None = None, welcome: str | None = None) -> None:
        super().__init__(id="chat-screen")
        self.session = session
        self.model_label = model_label
        self.state_choices = state_choices
        self.state_folders = state_folders
        self.demo_note = demo_note
        self.welcome = welcome
        self.editing = False  # the message box holds an edit of the last user message
        self.replying = False  # a reply worker is running
        self.working = 0  # session jobs asked for and not finished (a new conversation, an open, ...)
        self.queue = SessionQueue()
        self.last_sent: str | None = None  # kept on disk (chat/drafts.py) until its reply is stored
        self.listed_state_files: list[StateChoice] | None = None  # None until the first listing is in

    # ------------------------------------------------------------------ layout
    def compose(self):
        session = self.session
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                placeholder = (f"{self.welcome}\n\n" if self.welcome else "") + (
                    f"Type a message below and press {self.key_of('send')}; {self.key_of('help')} lists every key.")
                yield Conversation(user_label=session.user, assistant_label=session.assistant,
                                   placeholder=placeholder, id="conversation")
                prompt = PromptInput(id="prompt")
                prompt.border_title = "Message"
                yield prompt
            with Vertical(id="side"):
                yield SettingsPane(session.settings, id="settings")
                yield StateFilesPane([], active=session.state_file,
                                     folders=self.state_folders, id="states")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.list_state_files()
        self.conversation.show([Shown.of(m) for m in self.session.messages])
        self.refresh_status()
        self.query_one(PromptInput).focus()
        self.session.on_store_error = self._store_failed
        self.session.on_store_notice = self._stored_as_copy
        store = getattr(self.session, "store", None)
        if store is not None and store.problem:
            self.notify(store.problem, title="Conversation history", severity="warning", timeout=10)
        self._notice_copy()
        self.recover_unanswered()

    @work(thread=True, group="drafts")
    def recover_unanswered(self) -> None:
        """A message sent but not answered when the app was killed comes back in the box."""
        unanswered = drafts.recover()
        if unanswered:
            self.app.call_from_thread(self._unanswered_recovered, unanswered)

    def _unanswered_recovered(self, unanswered: list[str]) -> None:
        self.prompt.text = "\n\n".join(unanswered)
        self.prompt.move_cursor(self.prompt.document.end)
        self.notify("rwkv-chat stopped before answering your last message; it is back in the message box.",
                    title="Unanswered message", timeout=10)

    @work(thread=True, exclusive=True, group="state-files", exit_on_error=False)
    def list_state_files(self) -> None:
        """Read the state-file folders (every file's header) off the UI thread."""
        try:
            choices = self.state_choices()
        except OSError as error:
            self.app.call_from_thread(self.notify, str(error), title="Could not list the state files",
                                      severity="warning")
            choices = []
        self.app.call_from_thread(self._state_files_listed, choices)

    def _state_files_listed(self, choices: list[StateChoice]) -> None:
        self.listed_state_files = choices
        self.query_one(StateFilesPane).show(choices, self.session.state_file)

    def _store_failed(self, problem: str) -> None:
        """From the saver thread: the conversation could not be stored (it is still here)."""
        try:
            self.app.call_from_thread(self.notify, f"{problem}\nThe conversation is still here; "
                                      f"{self.key_of('save')} exports it to a file.",
                                      title="Could not keep the conversation", severity="error", timeout=10)
        except RuntimeError:  # the app has ended
            pass

    def _stored_as_copy(self, notice: str) -> None:
        """From the saver thread: the conversation was changed elsewhere; it goes on in a copy."""
        try:
            self.app.call_from_thread(self._notice_copy)
        except RuntimeError:  # the app has ended
            pass

    def _notice_copy(self) -> None:
        if getattr(self.session, "notice", None):
            self.notify(self.session.notice, title="Conversation history", severity="warning", timeout=15)
            self.session.notice = None
        self.refresh_status()

    def on_resize(self, event) -> None:
        narrow = event.size.width < NARROW_WIDTH
        self.set_class(narrow, "-narrow")
        self.query_one(Footer).compact = narrow  # tighter spacing: more keys fit

    @property
    def conversation(self) -> Conversation:
        return self.query_one(Conversation)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    def key_of(self, binding_id: str) -> str:
        return key_label(self.app.keys.get(binding_id, DEFAULT_KEYS[binding_id]))

    def refresh_status(self) -> None:
        session = self.session
        stats = next((m.stats for m in reversed(session.messages)
                      if m.role == "assistant" and getattr(m, "stats", None)), None)
        model = session.model
        self.query_one(StatusLine).info = StatusInfo(
            model=self.model_label,
            version=model.version,
            strategy=model.strategy,
            tokens=session.state.tokens if session.state is not None else 0,
            tokens_per_second=stats.tokens_per_second if stats else None,
            time_to_first_token=stats.time_to_first_token if stats else None,
            state_file=Path(session.state_file).stem if session.state_file else None,
            busy=self.replying,
            working=self.working > 0,
            note=self.demo_note,
        )

    def show_conversation(self) -> None:
        self.conversation.show([Shown.of(m) for m in self.session.messages])
        self.refresh_status()

    # ------------------------------------------------------------------ replies
    def start_reply(self, start: Callable[[], Iterable[str]], draft: str | None = None) -> None:
        """Run `start()` (a session call returning the reply) and its iteration in a thread, after
        the session jobs asked for before it; the conversation is drawn from what the session
        reports (ReplyStarted), never predicted. `draft`: the sent text, kept on disk until its
        reply is stored (chat/drafts.py)."""
        self.replying = True
        self.refresh_status()
        self.run_reply(start, draft, *self.queue.ticket())

    @work(thread=True, exclusive=True, group="reply", exit_on_error=False)
    def run_reply(self, start: Callable[[], Iterable[str]], draft: str | None,
                  previous: threading.Event, done: threading.Event) -> None:
        batcher = PieceBatcher(lambda text: self.post_message(self.ReplyText(text)))
        error = None
        try:
            if draft is not None:
                drafts.keep(draft)
            previous.wait()
            try:
                generation = start()
            finally:
                done.set()  # the reply has started (or failed): the next session job may run
            # copy the messages here, before iterating, so the screen never sees text twice
            self.post_message(self.ReplyStarted([Shown.of(m) for m in self.session.messages]))
            for piece in generation:
                batcher.add(piece)
        except Exception as problem:  # shown as a notification; the session keeps what it had
            error = problem
        finally:
            batcher.flush()
            self.post_message(self.ReplyEnded(error))

    @on(ReplyStarted)
    def _reply_started(self, event: ReplyStarted) -> None:
        self.conversation.show(event.messages, streaming=True)  # the last message is the reply

    @on(ReplyText)
    def _reply_text(self, event: ReplyText) -> None:
        self.conversation.append_to_reply(event.text)

    @on(ReplyEnded)
    def _reply_ended(self, event: ReplyEnded) -> None:
        self.replying = False
        if event.error is not None:
            self.notify(str(event.error), title="Reply failed", severity="error")
        self.show_conversation()
        if self.last_sent is not None:
            self.forget_unanswered(self.last_sent)

    # ------------------------------------------------------------------ session jobs
    def run_in_order(self, job: Callable[[], object], done: Callable[[object], None], failed: str,
                     hint: str = "") -> None:
        """Run `job()` (session work: model or disk) in a thread worker after the session jobs
        asked for before it; then, on the UI thread, `done(result)`, or on an error a
        notification titled `failed`, its text followed by `hint` (the session is unchanged)."""
        self.working += 1
        self.refresh_status()
        self.session_job(job, done, (failed, hint), *self.queue.ticket())

    @work(thread=True, group="session", exit_on_error=False)
    def session_job(self, job, done, failed: tuple[str, str], previous: threading.Event, finished: threading.Event) -> None:
        try:
            previous.wait()
            try:
                result, error = job(), None
            except Exception as problem:  # shown as a notification; the session keeps what it had
                result, error = None, problem
            self.app.call_from_thread(self._session_job_ended, done, failed, result, error)
        except RuntimeError:  # the app has ended
            pass
        finally:
            finished.set()

    def _session_job_ended(self, done, failed: tuple[str, str], result, error: BaseException | None) -> None:
        self.working -= 1
        if error is None:
            done(result)
        else:
            title, hint = failed
            self.notify(f"{error}\n{hint}" if hint else str(error), title=title, severity="error")
        self.refresh_status()

    @work(thread=True, group="drafts")
    def forget_unanswered(self, text: str) -> None:
        """The message is part of the conversation once the reply is stored (or when there is
        no history to store it in)."""
        if self.session.wait_stored(60):
            drafts.clear(text)

    def busy_notice(self) -> bool:
        """True (after telling the user) when a reply is running."""
        if self.replying or self.session.busy:
            self.notify(f"A reply is being generated; press {self.key_of('stop')} to stop it first.",
                        severity="warning")
            return True
        return False

    def last_index(self, role: str) -> int | None:
        return next((i for i in range(len(self.session.messages) - 1, -1, -1)
                     if self.session.messages[i].role == role), None)

    @on(PromptInput.Submitted)
    def _submitted(self, event: PromptInput.Submitted) -> None:
        if self.busy_notice():
            return  # the text stays in the box
        text = event.text
        self.last_sent = text
        if self.editing:
            self.editing = False
            self.prompt.border_title = "Message"
            self.start_reply(lambda: self.session.edit_last(text), draft=text)
        else:
            self.start_reply(lambda: self.session.send(text), draft=text)
        event.prompt.take(text)

    # ------------------------------------------------------------------ actions
    def action_stop(self) -> None:
        """Esc: from a pane or the conversation, back to the message box; in the box, stop the
        running reply, else cancel an edit."""
        focused = self.focused
        if focused is not self.prompt:
            self.prompt.focus()
            return
        if self.replying or self.session.busy:
            self.session.stop()
        elif self.editing:
            self.editing = False
            self.prompt.clear()
            self.prompt.border_title = "Message"

    def action_regenerate(self) -> None:
        if self.busy_notice():
            return
        if self.last_index("assistant") is None:
            self.notify("There is no reply to regenerate yet.")
            return
        self.start_reply(self.session.regenerate)

    def action_continue_reply(self) -> None:
        if self.busy_notice():
            return
        if not self.session.messages or self.session.messages[-1].role != "assistant":
            self.notify("There is no reply to continue.")
            return
        self.start_reply(self.session.continue_reply)

    def action_edit_last(self) -> None:
        if self.busy_notice():
            return
        index = self.last_index("user")
        if index is None:
            self.notify("There is no message to edit yet.")
            return
        self.editing = True
        self.prompt.text = self.session.messages[index].text
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.border_title = (f"Editing the last message ({self.key_of('send')} resend, "
                                    f"{self.key_of('stop')} cancel)")
        self.prompt.focus()

    def action_new_conversation(self) -> None:
        """A new conversation (the current one is already in the history); the starting state
        may need a prefill (after an open, or a new system prompt), so it runs as a session job."""
        if self.busy_notice():
            return
        # it fails e.g. when the conversation's state file is gone
        self.run_in_order(self.session.reset, self._new_conversation_started, "Could not start a new conversation",
                          hint=f"The conversation was kept; pick another state file ({self.key_of('state_files')}) "
                               "to start over.")

    def _new_conversation_started(self, _result) -> None:
        self.show_conversation()
        self.notify("New conversation" + (f" from state {Path(self.session.state_file).stem}"
                                          if self.session.state_file else ""))

    def action_save_snapshot(self) -> None:
        """Export the conversation to a shareable .rwkvchat file (a session job)."""
        if self.busy_notice():
            return
        self.run_in_order(self.session.save, lambda path: self.notify(f"Saved to {path}", title="Conversation saved"),
                          "Could not save")

    def action_open_snapshot(self) -> None:
        """The history: stored conversations and snapshot files."""
        if self.busy_notice():
            return
        dialog = HistoryScreen(self.session.store, snapshot_folder=locations.snapshots_dir(),
                               current_id=self.session.conversation_id, on_renamed=self._renamed)
        self.app.push_screen(dialog, self.open_entry)

    def _renamed(self, conversation_id: str, title: str) -> None:
        if conversation_id == self.session.conversation_id:
            self.session.title = title

    def open_entry(self, entry: HistoryEntry | Path | None) -> None:
        """Open a history entry or a snapshot file (the current conversation is already stored)."""
        if entry is None or self.busy_notice():
            return
        if isinstance(entry, (str, Path)):
            entry = HistoryEntry(Path(entry).name, None, "", 0, path=Path(entry))

        def open_it() -> None:
            if entry.conversation_id is not None:
                self.session.open_stored(self.session.store, entry.conversation_id)
            else:
                self.session.restore(entry.path)

        self.run_in_order(open_it, lambda _result: self._opened(entry), "Could not open the conversation")

    open_snapshot = open_entry

    def _opened(self, entry: HistoryEntry) -> None:
        self.query_one(SettingsPane).settings = self.session.settings
        self.query_one(StateFilesPane).set_active(self.session.state_file)
        self.conversation.labels = {"user": self.session.user, "assistant": self.session.assistant}
        self.show_conversation()
        self.notify(f"Opened {entry.name}")
        self._notice_copy()

    def action_nudge(self, field: str, delta: float) -> None:
        settings = self.session.settings.nudge(field, delta)
        self.session.settings = settings  # the running reply reads it before its next token
        self.query_one(SettingsPane).settings = settings
        if not self.query_one("#side").display:
            self.notify(f"{field} {getattr(settings, field):g}", timeout=1.5)

    def action_toggle_panes(self) -> None:
        if self.has_class("-narrow"):
            self.toggle_class("-side-open")
        else:
            self.toggle_class("-side-closed")

    def action_focus_pane(self, pane: str) -> None:
        self.remove_class("-side-closed")
        if self.has_class("-narrow"):
            self.add_class("-side-open")
        target = "#state-list" if pane == "states" else "#setting-temperature"
        self.call_after_refresh(self.query_one(target).focus)

    def action_focus_conversation(self) -> None:
        conversation = self.conversation
        if conversation.has_focus:
            conversation.action_select(-1)
        else:
            conversation.focus()

    def action_edit_persona(self) -> None:
        if self.busy_notice():
            return
        self.app.push_screen(PersonaDialog(self.session.preamble.strip()), self.set_persona)

    def set_persona(self, text: str | None) -> None:
        if text is None or text.strip() == self.session.preamble.strip():
            return
        if self.busy_notice():
            return
        self.run_in_order(lambda: self.session.set_preamble(text), self._persona_set, "Could not set the system prompt")

    def _persona_set(self, _result) -> None:
        if self.session.messages:
            self.notify(f"The new system prompt applies from the next conversation ({self.key_of('new')}).",
                        title="System prompt set")
        else:
            self.show_conversation()
            self.notify("System prompt set.")

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(self.app.keys, self.app.config_path))

    # ------------------------------------------------------------------ pane messages
    @on(SettingsPane.Changed)
    def _settings_changed(self, event: SettingsPane.Changed) -> None:
        self.session.settings = event.settings

    @on(StateFilesPane.Chosen)
    def _state_chosen(self, event: StateFilesPane.Chosen) -> None:
        self.load_state_file(event.path)

    @on(StateFilesPane.Refused)
    def _state_refused(self, event: StateFilesPane.Refused) -> None:
        self.notify(event.reason, title="This state file does not fit the model", severity="warning")

    def load_state_file(self, path: Path) -> None:
        """Start a new conversation from a tuned state (read and prefilled as a session job); on
        failure the conversation is untouched."""
        if self.busy_notice():
            return
        self.run_in_order(lambda: self.session.load_state_file(path), lambda _result: self._state_file_loaded(path),
                          "Could not load the state file")

    def _state_file_loaded(self, path: Path) -> None:
        self.query_one(StateFilesPane).set_active(self.session.state_file)
        self.show_conversation()
        self.notify(f"New conversation from state {Path(path).stem}")
        self.prompt.focus()
