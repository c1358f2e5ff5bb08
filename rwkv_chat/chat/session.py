"""A chat conversation over a Pipeline: turns, regenerate / continue / edit, snapshots.

The model sees (ChatRWKV's chat format, written by `template`):

    {preamble}User: {message}\\n\\nAssistant: {reply}\\n\\nUser: {message}\\n\\nAssistant: ...

* The user's message is stripped and its blank lines collapsed, so it can never contain the
  "\\n\\n" that ends a turn. A non-empty preamble is stripped and followed by "\\n\\n".
* A reply is generated with the stop string "\\n\\n" and end-of-text banned. The stop string's
  tokens stay in the state, so the next turn follows directly. A reply that ended any other
  way (stopped, cancelled, max_tokens) gets "\\n\\n" fed in front of the next user turn.
* The reply usually starts with a space (the prompt ends with "Assistant:"); the displayed
  text is the reply stripped of whitespace at both ends (the raw text is kept for the model).
* States are never mutated by the model, so the session keeps the states from before the last
  user message and before the last reply, which makes regenerate and edit exact.

Threads: a UI may iterate the object `send()` returns in a worker thread while it calls `stop()`
or assigns `settings` from its own thread; the new settings apply from the next token on.

History: with a store attached (`attach_store`), the conversation is stored after every
finished or stopped reply (edit, regenerate and continue included), settings change and
rename, by a background thread, so no caller waits for the disk. `wait_stored()` waits for it;
`close()` flushes it. A failed store is reported through `store_error` / `on_store_error`;
the conversation in memory is never touched by it. The session claims the stored conversation
it has open (store.py): one open in another rwkv-chat opens here as a copy, and a save refused
because another writer stored the conversation meanwhile goes to a copy too. Either way both
versions are kept, and `notice` / `on_store_notice` tell the user.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..engine.state import RWKVState
from ..errors import SnapshotError
from ..pipeline import Generation, GenerationStats, Pipeline
from ..sampling import END_OF_TEXT, SamplingSettings
from . import snapshot as snapshots
from .store import StoreConflict, new_conversation_id, one_line, title_from
from .template import TURN_END, clean_user_message, normalise_preamble, turn_prompt

ROLES = ("user", "assistant")


@dataclass
class Message:
    """One message as shown. An assistant message also carries how it was generated."""

    role: str
    text: str
    stats: GenerationStats | None = None
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "role": self.role,
            "text": self.text,
            "stats": None if self.stats is None else self.stats.to_dict(),
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Message:
        if data.get("role") not in ROLES or not isinstance(data.get("text"), str):
            raise ValueError(f"not a chat message: {data!r:.80}")
        stats = data.get("stats")
        return cls(data["role"], data["text"], None if stats is None else GenerationStats.from_dict(stats),
                   data.get("finish_reason"))


def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise ValueError(f"the {what} name must be a non-empty single line, got {name!r}")
    return name.strip()


@dataclass
class _Turn:
    """The last user message and its reply, as the model saw them."""

    prompt: str  # fed before the reply: ["\n\n"] "User: {message}\n\nAssistant:"
    state_before_user: RWKVState
    state_before_reply: RWKVState | None = None  # None until the prompt has been fed
    raw_reply: str = ""  # the reply exactly as generated (leading space included)
    ended_by_stop: bool = False  # a stop string ended it: the state holds tokens past raw_reply


@dataclass
class _Saved:
    """Everything a failed reply must put back."""

    messages: list[Message]
    state: RWKVState
    turn: _Turn | None
    needs_turn_end: bool


class ChatSession:
    """A conversation. See the module docstring for the format and threading rules.

    `messages`: the conversation as shown. `state`: the model state after it (while a reply
    runs: after the reply's tokens so far). `settings`: assign any time. `state_file`: the tuned
    state the conversation started from. `snapshot_path`: where `save()` writes by default.
    """

    def __init__(self, pipeline: Pipeline, settings: SamplingSettings | None = None, *, user: str = "User",
                 assistant: str = "Assistant", preamble: str = "", state_file=None):
        self.pipeline = pipeline
        self._settings = settings if settings is not None else SamplingSettings()
        self.user = _check_name("user", user)
        self.assistant = _check_name("assistant", assistant)
        self.preamble = normalise_preamble(preamble)
        self.state_file: Path | None = None if state_file is None else Path(state_file)
        self.snapshot_path: Path | None = None
        self.messages: list[Message] = []
        self._lock = threading.RLock()
        self._reply: ChatReply | None = None
        self._turn: _Turn | None = None
        self._needs_turn_end = False
        self._starting_state: RWKVState | None = None
        self._cached_reply_settings: tuple[SamplingSettings, SamplingSettings] | None = None
        self.conversation_id = new_conversation_id()
        self.title: str | None = None  # a title the user gave; None: the first message
        self.created = time.time()
        self.store = None
        self.store_error: str | None = None
        self.on_store_error: Callable[[str], None] | None = None  # called from the saver thread
        self.on_store_notice: Callable[[str], None] | None = None  # ... when changes went to a copy
        self.notice: str | None = None  # why the conversation opened as a copy, for the UI
        self._stored_revs: dict[str, int] = {}  # conversation id -> the revision this session stored or loaded
        self._copies: dict[str, str] = {}  # conversation id -> the copy its changes go to
        self._saver: _Saver | None = None
        self.state: RWKVState = self._conversation_start()

    @property
    def model(self):
        return self.pipeline.model

    @property
    def settings(self) -> SamplingSettings:
        return self._settings

    @settings.setter
    def settings(self, value: SamplingSettings) -> None:
        """Safe from any thread; a running reply uses the new settings from its next token."""
        if not isinstance(value, SamplingSettings):
            raise TypeError(f"settings must be SamplingSettings, not {type(value).__name__}")
        changed = value != self._settings
        self._settings = value
        if changed and self._reply is None:  # a running reply stores them when it ends
            self._changed()

    @property
    def busy(self) -> bool:
        return self._reply is not None

    # ------------------------------------------------------------------ starting states
    def _conversation_start(self) -> RWKVState:
        """The state every conversation starts from: the state file (or the model's initial
        state) with the preamble fed. Computed once and kept (states are never mutated)."""
        if self._starting_state is None:
            base = self.model.initial_state() if self.state_file is None else self.model.load_state(self.state_file)
            self._starting_state = self.pipeline.prefill(self.preamble, base)
        return self._starting_state

    def _begin_new_conversation(self, start: RWKVState) -> None:
        self.messages = []
        self.state = start
        self._turn = None
        self._needs_turn_end = False
        self.snapshot_path = None
        self._new_identity()

    def _new_identity(self) -> None:
        self._release_claim()
        self.conversation_id = new_conversation_id()
        self.title = None
        self.created = time.time()

    def _release_claim(self) -> None:
        if self.store is not None:
            self.store.release(self.conversation_id)

    def reset(self) -> None:
        """An empty conversation from the starting state (the state file is kept)."""
        with self._lock:
            self._require_idle()
            self._begin_new_conversation(self._conversation_start())

    def load_state_file(self, path) -> None:
        """A new conversation starting from a tuned state file (None: from the model's own
        initial state). If the file cannot be used, this raises and nothing changes."""
        with self._lock:
            self._require_idle()
            base = self.model.initial_state() if path is None else self.model.load_state(path)
            start = self.pipeline.prefill(self.preamble, base)
            self.state_file = None if path is None else Path(path)
            self._starting_state = start
            self._begin_new_conversation(start)

    def set_preamble(self, preamble: str) -> None:
        """Use `preamble` (the system prompt / persona) for new conversations. An empty
        conversation starts over from it at once; a conversation with messages keeps its state
        (its start is already in it) and the next `reset` uses the new preamble."""
        with self._lock:
            self._require_idle()
            preamble = normalise_preamble(preamble)
            base = self.model.initial_state() if self.state_file is None else self.model.load_state(self.state_file)
            start = self.pipeline.prefill(preamble, base)
            self.preamble = preamble
            self._starting_state = start
            if not self.messages:
                self._begin_new_conversation(start)

    # ------------------------------------------------------------------ replies
    def send(self, text: str) -> ChatReply:
        """Add a user message and start the reply; iterate the result for the reply's text."""
        message = clean_user_message(text)
        with self._lock:
            self._require_idle()
            saved = self._save_for_rollback()
            prompt = self._turn_prompt(message, self._needs_turn_end)
            turn = _Turn(prompt, state_before_user=self.state)
            self._turn = turn
            self.messages.append(Message("user", message))
            return self._start_reply(saved, Message("assistant", ""), lambda: self._feed_prompt(turn))

    def regenerate(self) -> ChatReply:
        """Drop the last reply and generate it again from the exact state before it."""
        with self._lock:
            self._require_idle()
            turn = self._require_last_turn("regenerate")
            saved = self._save_for_rollback()
            self.messages.pop()
            turn.raw_reply = ""
            return self._start_reply(saved, Message("assistant", ""), lambda: self._state_before_reply(turn))

    def continue_reply(self) -> ChatReply:
        """Generate more of the last reply (same message; its text grows).

        A reply that was cut short (stopped, cancelled, max_tokens) continues from the current
        state, which holds exactly its tokens. A reply that ended with a stop string ("\\n\\n")
        has that string's tokens in the state, so the state is rebuilt: the state before the
        reply plus the reply's raw text re-encoded. The model then sees the reply without its
        ending (the same text, possibly split into tokens differently than it was generated)."""
        with self._lock:
            self._require_idle()
            turn = self._require_last_turn("continue")
            saved = self._save_for_rollback()
            message = self.messages.pop()
            return self._start_reply(saved, message, lambda: self._state_to_continue(turn), continuing=True)

    def edit_last(self, text: str) -> ChatReply:
        """Replace the last user message (and its reply) with `text`, then reply to it."""
        message = clean_user_message(text)
        with self._lock:
            self._require_idle()
            turn = self._require_last_turn("edit")
            saved = self._save_for_rollback()
            del self.messages[self._last_user_index():]
            separated = turn.prompt.startswith(TURN_END)
            new_turn = _Turn(self._turn_prompt(message, separated), state_before_user=turn.state_before_user)
            self._turn = new_turn
            self.state = turn.state_before_user
            self.messages.append(Message("user", message))
            return self._start_reply(saved, Message("assistant", ""), lambda: self._feed_prompt(new_turn))

    def stop(self) -> None:
        """Stop the running reply after the current token (thread-safe); its text is kept."""
        reply = self._reply
        if reply is not None:
            reply.cancel()

    def _turn_prompt(self, message: str, needs_turn_end: bool) -> str:
        return turn_prompt(message, self.user, self.assistant, end_previous=needs_turn_end)

    def _feed_prompt(self, turn: _Turn) -> tuple[RWKVState, int]:
        tokens = self.pipeline.encode(turn.prompt)
        turn.state_before_reply = self.pipeline.prefill_tokens(tokens, turn.state_before_user)
        return turn.state_before_reply, len(tokens)

    def _state_before_reply(self, turn: _Turn) -> tuple[RWKVState, int]:
        if turn.state_before_reply is None:  # after a restore: rebuilt from the state before the turn
            return self._feed_prompt(turn)
        return turn.state_before_reply, 0

    def _state_to_continue(self, turn: _Turn) -> tuple[RWKVState, int]:
        if not turn.ended_by_stop:  # the state ends with the reply's own tokens
            return self.state, 0
        before_reply, prompt_tokens = self._state_before_reply(turn)
        tokens = self.pipeline.encode(turn.raw_reply)
        return self.pipeline.prefill_tokens(tokens, before_reply), prompt_tokens + len(tokens)

    def _require_idle(self) -> None:
        if self._reply is not None:
            raise RuntimeError("a reply is being generated; stop it first")

    def _require_last_turn(self, action: str) -> _Turn:
        if self._turn is None or not self.messages or self.messages[-1].role != "assistant":
            raise RuntimeError(f"nothing to {action}: the conversation has no reply yet")
        return self._turn

    def _last_user_index(self) -> int:
        return max(i for i, message in enumerate(self.messages) if message.role == "user")

    def _save_for_rollback(self) -> _Saved:
        turn = None if self._turn is None else replace(self._turn)
        return _Saved([replace(m) for m in self.messages], self.state, turn, self._needs_turn_end)

    def _rollback(self, saved: _Saved) -> None:
        with self._lock:
            self.messages = saved.messages
            self.state = saved.state
            self._turn = saved.turn
            self._needs_turn_end = saved.needs_turn_end
            self._reply = None

    def _start_reply(self, saved: _Saved, message: Message, prepare, continuing: bool = False) -> ChatReply:
        self.messages.append(message)
        self._reply = ChatReply(
            self.pipeline, message, prepare, settings=self._reply_settings,
            on_state=self._reply_advanced, on_finish=self._finish_reply, on_withdraw=lambda: self._rollback(saved),
            raw_text=self._turn.raw_reply if continuing else "", previous_stats=message.stats if continuing else None)
        return self._reply

    def _reply_advanced(self, state: RWKVState) -> None:
        """From the reply's thread: the state after the prompt / after each generated token."""
        self.state = state

    def _reply_settings(self) -> SamplingSettings:
        """The user's settings plus what the chat format needs: stop at "\\n\\n", no end-of-text."""
        settings = self.settings
        cached = self._cached_reply_settings
        if cached is not None and cached[0] is settings:
            return cached[1]
        token_ban = settings.token_ban if END_OF_TEXT in settings.token_ban else (*settings.token_ban, END_OF_TEXT)
        stop = settings.stop if TURN_END in settings.stop else (TURN_END, *settings.stop)
        result = settings.replace(token_ban=token_ban, stop=stop)
        self._cached_reply_settings = (settings, result)
        return result

    def _finish_reply(self, reply: ChatReply, state: RWKVState, fed_text: str) -> None:
        with self._lock:
            self.state = state
            self._turn.raw_reply = reply.raw_text
            self._turn.ended_by_stop = reply.message.finish_reason == "stop"
            self._needs_turn_end = not fed_text.endswith(TURN_END)
            self._reply = None
            self._changed()

    # ------------------------------------------------------------------ history
    def attach_store(self, store, *, store_now: bool = True) -> None:
        """Keep this conversation (and every later one) in `store` (a ConversationStore) from
        now on; stores the current conversation if it has messages (unless `store_now` is
        False: it was just read from there)."""
        with self._lock:
            self.store = store
            if self._saver is None:
                self._saver = _Saver(self._report_store_error)
            if store_now:
                self._changed()

    def rename(self, title: str) -> None:
        """Give the conversation a title (instead of its first message) and store it."""
        title = one_line(title)
        if not title:
            raise ValueError("the title cannot be empty")
        with self._lock:
            self.title = title
            self._changed()

    def wait_stored(self, timeout: float | None = 30.0) -> bool:
        """Wait until every change so far is stored (or failed); False on timeout."""
        return True if self._saver is None else self._saver.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Store what is pending and stop the saver thread (the app calls this on exit)."""
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.close(timeout)
        self._release_claim()

    def _changed(self) -> None:
        """Queue the conversation for storing (nothing to do without a store or messages)."""
        with self._lock:
            store, saver = self.store, self._saver
            if store is None or saver is None or not self.messages or self._reply is not None:
                return
            data, states = self._snapshot_parts()
            conversation_id, title, created = self.conversation_id, self.title, self.created

        def job() -> None:
            tensors = {name: state.to_tensors() for name, state in states.items()}
            target = self._copies.get(conversation_id, conversation_id)
            try:
                # the open conversation stays claimed; one left meanwhile relies on the revision check
                if target == self.conversation_id and not store.claim(target):
                    raise StoreConflict(f"conversation {target} is open in another rwkv-chat")
                rev = store.save(target, data, tensors, title=title, created=created,
                                 expect_rev=self._stored_revs.get(target))
            except StoreConflict:
                target, rev = self._store_copy(store, conversation_id, target, data, tensors, title, created)
            self._stored_revs[target] = rev

        saver.submit(conversation_id, job)

    def _store_copy(self, store, conversation_id: str, original: str, data: dict, tensors: dict,
                    title: str | None, created: float) -> tuple[str, int]:
        """From the saver thread: another writer stored `original` since this session did, so
        this version goes to a new conversation, which the session goes on in."""
        copy_id, copy_title = new_conversation_id(), _copy_title(title, data.get("messages", []))
        rev = store.save(copy_id, data, tensors, title=copy_title, created=created, expect_rev=None)
        store.release(original)
        self._copies[conversation_id] = self._copies[original] = copy_id
        if self.conversation_id in (conversation_id, original):  # still open here: go on in the copy
            store.claim(copy_id)
            self.conversation_id, self.title = copy_id, copy_title
        notice = (f"This conversation was changed in another rwkv-chat window meanwhile. Both versions are "
                  f"kept: yours goes on as {copy_title!r}.")
        self.notice = notice
        if self.on_store_notice is not None:
            self.on_store_notice(notice)
        return copy_id, rev

    def _report_store_error(self, error: str | None) -> None:
        self.store_error = error
        callback = self.on_store_error
        if error is not None and callback is not None:
            callback(error)

    def open_stored(self, store, conversation_id: str) -> None:
        """Replace this conversation with one from the history (see `restore`); it goes on
        being stored under its own id."""
        with self._lock:
            self._require_idle()
            file, title, rev = store.load_with_revision(conversation_id)
            loaded = _LoadedSnapshot.from_file(file, self.model)
            self._apply(loaded)
            self.snapshot_path = None
            self._release_claim()
            if store.claim(conversation_id):
                meta = file.data.get("conversation") if isinstance(file.data.get("conversation"), dict) else {}
                self.conversation_id, self.title, self.notice = conversation_id, title, None
                self._stored_revs[conversation_id] = rev
                created = meta.get("created")
                self.created = float(created) if isinstance(created, (int, float)) else time.time()
            else:  # open in another window: go on in a copy, so neither overwrites the other
                self._new_identity()
                self.title = _copy_title(title, file.data.get("messages", []))
                self.notice = (f"This conversation is open in another rwkv-chat window, so it opened here as a "
                               f"copy, {self.title!r}: both are kept.")

    @classmethod
    def from_store(cls, pipeline: Pipeline, store, conversation_id: str) -> ChatSession:
        """A new session continuing a stored conversation, attached to `store`."""
        session = cls(pipeline)
        session.open_stored(store, conversation_id)
        session.attach_store(store, store_now=False)
        return session

    # ------------------------------------------------------------------ snapshots
    def save(self, path=None) -> Path:
        """Save the conversation (default: where it was last saved or opened from, else a new
        timestamped file in the user's snapshots folder). Returns the path."""
        with self._lock:
            self._require_idle()
            data, states = self._snapshot_contents()
            if path is not None or self.snapshot_path is not None:
                target = snapshots.write_snapshot(Path(path) if path is not None else self.snapshot_path, data, states)
            else:  # a new name that nobody else can take meanwhile (another instance saving too)
                target = snapshots.write_snapshot(snapshots.default_snapshot_path(), data, states, new_file=True)
            self.snapshot_path = target
            return target

    def _snapshot_contents(self) -> tuple[dict, dict]:
        data, states = self._snapshot_parts()
        return data, {name: state.to_tensors() for name, state in states.items()}

    def _snapshot_parts(self) -> tuple[dict, dict[str, RWKVState]]:
        """The snapshot's JSON part and its states (unconverted: states are never mutated)."""
        model = self.model
        turn = self._turn
        data = {
            "messages": [message.to_dict() for message in self.messages],
            "settings": self.settings.to_dict(),
            "model": {"path": os.path.abspath(model.path), "name": Path(model.path).name,
                      "version": model.shape.version, "shape": model.shape.to_dict(), "fingerprint": model.fingerprint},
            "state_file": None if self.state_file is None else str(self.state_file),
            "tokens": self.state.tokens,
            "chat": {"user": self.user, "assistant": self.assistant, "preamble": self.preamble},
            "needs_turn_end": self._needs_turn_end,
            "last_turn": None if turn is None else {
                "prompt": turn.prompt, "raw_reply": turn.raw_reply, "ended_by_stop": turn.ended_by_stop,
                "tokens_before": turn.state_before_user.tokens},
        }
        states = {snapshots.MAIN_STATE: self.state}
        if turn is not None:
            states[snapshots.TURN_START_STATE] = turn.state_before_user
        return data, states

    def restore(self, path) -> None:
        """Replace this conversation (messages, state, settings, names, preamble) with a saved
        one. A damaged file or one saved with another model shape raises, and nothing changes."""
        with self._lock:
            self._require_idle()
            loaded = _LoadedSnapshot.read(path, self.model)
            self._apply(loaded)
            self.snapshot_path = Path(path)
            self._new_identity()  # kept in the history as a new conversation from its next change

    def _apply(self, loaded: _LoadedSnapshot) -> None:
        self._settings = loaded.settings
        self.user, self.assistant, self.preamble = loaded.user, loaded.assistant, loaded.preamble
        self.state_file = loaded.state_file
        self._starting_state = None  # rebuilt on reset, from the state file and preamble
        self.messages = loaded.messages
        self.state = loaded.state
        self._turn = loaded.turn
        self._needs_turn_end = loaded.needs_turn_end

    @classmethod
    def open(cls, pipeline: Pipeline, path) -> ChatSession:
        """A new session from a snapshot file."""
        session = cls(pipeline)
        session.restore(path)
        return session


@dataclass
class _LoadedSnapshot:
    """A snapshot turned into session parts, fully validated before any session changes."""

    settings: SamplingSettings
    user: str
    assistant: str
    preamble: str
    state_file: Path | None
    messages: list[Message]
    state: RWKVState
    turn: _Turn | None
    needs_turn_end: bool

    @classmethod
    def read(cls, path, model) -> _LoadedSnapshot:
        return cls.from_file(snapshots.read_snapshot(path), model)

    @classmethod
    def from_file(cls, file: snapshots.SnapshotFile, model) -> _LoadedSnapshot:
        file.require_shape(model.shape)
        data = file.data
        try:
            chat = data.get("chat") or {}
            last_turn = data.get("last_turn")
            turn = None
            if last_turn is not None:
                turn_start = file.states[snapshots.TURN_START_STATE]
                before_user = model.state_from_tensors(turn_start, int(last_turn["tokens_before"]))
                turn = _Turn(str(last_turn["prompt"]), before_user, raw_reply=str(last_turn["raw_reply"]),
                             ended_by_stop=bool(last_turn.get("ended_by_stop", False)))
            return cls(
                settings=SamplingSettings.from_dict(data["settings"]),
                user=_check_name("user", chat.get("user", "User")),
                assistant=_check_name("assistant", chat.get("assistant", "Assistant")),
                preamble=str(chat.get("preamble", "")),
                state_file=None if data.get("state_file") is None else Path(data["state_file"]),
                messages=[Message.from_dict(m) for m in data["messages"]],
                state=model.state_from_tensors(file.states[snapshots.MAIN_STATE], int(data["tokens"])),
                turn=turn,
                needs_turn_end=bool(data.get("needs_turn_end", False)),
            )
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise SnapshotError(f"{file.path}: the snapshot is damaged ({detail})") from error


class ChatReply:
    """The reply being generated: iterate it for text pieces, which add up to `message.text`.

    Like `Generation`: `cancel()` (thread-safe) or `close()` stop it, keeping the partial reply;
    `text`, `state`, `stats`, `finish_reason` and `message` can be read at any time. The
    session's messages and state are updated as it runs and settled when it ends. If it fails
    with an exception, the session is put back as it was before the reply started.
    """

    def __init__(self, pipeline: Pipeline, message: Message, prepare: Callable[[], tuple[RWKVState, int]], *,
                 settings: Callable[[], SamplingSettings], on_state: Callable[[RWKVState], None],
                 on_finish: Callable[[ChatReply, RWKVState, str], None], on_withdraw: Callable[[], None],
                 raw_text: str = "", previous_stats: GenerationStats | None = None):
        """Made by the session, which owns the transitions: `prepare()` gives the starting state
        and the prompt's token count, `settings` is read before every token, `on_state` gets each
        new state, `on_finish(reply, state, fed_text)` settles the session, `on_withdraw()` puts
        it back as it was (a failed or never-started reply)."""
        self.pipeline = pipeline
        self.message = message
        self._prepare = prepare
        self._settings = settings
        self._on_state, self._on_finish, self._on_withdraw = on_state, on_finish, on_withdraw
        self._previous_stats = previous_stats
        self.raw_text = raw_text
        self._cancelled = threading.Event()
        self._generation: Generation | None = None
        self._start_state: RWKVState | None = None
        self._prompt_tokens = 0
        self._prefill_seconds = 0.0
        self._started = False
        self._settled = False
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self._cancelled.set()
        generation = self._generation
        if generation is not None:
            generation.cancel()

    def close(self) -> None:
        """Stop from the iterating thread (other threads: `cancel()` or `session.stop()`).
        A reply that never started is withdrawn entirely."""
        self.cancel()
        self._pieces.close()
        if not self._settled:
            if self._started:
                self._settle()
            else:
                self._settled = True
                self._on_withdraw()

    @property
    def text(self) -> str:
        return self.message.text

    @property
    def state(self) -> RWKVState | None:
        if self._generation is not None:
            return self._generation.state
        return self._start_state

    @property
    def tokens(self) -> list[int]:
        """The tokens generated by this run (for a continuation: the new ones only)."""
        return [] if self._generation is None else list(self._generation.tokens)

    @property
    def finish_reason(self) -> str | None:
        return self.message.finish_reason if self._settled else None

    @property
    def stats(self) -> GenerationStats:
        generation = self._generation.stats if self._generation is not None else GenerationStats()
        stats = GenerationStats(
            prompt_tokens=self._prompt_tokens,
            generated_tokens=generation.generated_tokens,
            time_to_first_token=None if generation.time_to_first_token is None
            else self._prefill_seconds + generation.time_to_first_token,
            seconds=self._prefill_seconds + generation.seconds,
            tokens_per_second=generation.tokens_per_second,
        )
        return stats if self._previous_stats is None else _combined(self._previous_stats, stats)

    def _run(self) -> Iterator[str]:
        self._started = True
        try:
            started_at = time.perf_counter()
            self._start_state, self._prompt_tokens = self._prepare()
            self._prefill_seconds = time.perf_counter() - started_at
            self._on_state(self._start_state)
            self._generation = self.pipeline.stream("", self._start_state, self._settings)
            if self._cancelled.is_set():
                self._generation.cancel()
            for piece in self._generation:
                self._on_state(self._generation.state)
                shown = self._append(piece)
                if shown:
                    yield shown
        except GeneratorExit:
            if self._generation is not None:
                self._generation.close()
            self._settle()
            raise
        except BaseException:
            self._settled = True
            self._on_withdraw()
            raise
        self._settle()

    def _append(self, piece: str) -> str:
        """Add raw generated text; return the part that is newly shown. Whitespace at either end
        is not shown (trailing whitespace appears once text follows it), so the pieces always
        add up to `message.text`."""
        shown_before = self.raw_text.strip()
        self.raw_text += piece
        shown = self.raw_text.strip()
        self.message.text = shown
        return shown[len(shown_before):]

    def _settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        generation = self._generation
        state = generation.state if generation is not None else self._start_state
        fed = self.pipeline.decode(generation.tokens) if generation is not None else ""
        self.message.finish_reason = generation.finish_reason if generation is not None else "cancelled"
        if self.message.finish_reason is None:
            self.message.finish_reason = "cancelled"
        self.message.stats = self.stats
        self._on_finish(self, state, fed)


def _combined(first: GenerationStats, second: GenerationStats) -> GenerationStats:
    """Stats of a reply generated in two runs (a reply and its continuation)."""
    generated = first.generated_tokens + second.generated_tokens
    decode_seconds = sum(s.generated_tokens / s.tokens_per_second for s in (first, second) if s.tokens_per_second)
    return GenerationStats(
        prompt_tokens=first.prompt_tokens + second.prompt_tokens,
        generated_tokens=generated,
        time_to_first_token=first.time_to_first_token,
        seconds=first.seconds + second.seconds,
        tokens_per_second=generated / decode_seconds if decode_seconds else 0.0,
    )


def _copy_title(title: str | None, messages: list) -> str:
    """The title of a conversation's copy: its own (the user's, or from the first message) marked."""
    return f"{title or title_from(messages)} (copy)"


class _Saver:
    """A background thread running store jobs in order; a newer job for the same conversation
    replaces one still waiting. Errors go to `report(message)`, success to `report(None)`."""

    def __init__(self, report: Callable[[str | None], None]):
        self._report = report
        self._condition = threading.Condition()
        self._pending: dict[str, Callable[[], None]] = {}
        self._running = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rwkv-chat-store", daemon=True)
        self._thread.start()

    def submit(self, key: str, job: Callable[[], None]) -> None:
        with self._condition:
            self._pending.pop(key, None)
            self._pending[key] = job
            self._condition.notify_all()

    def wait(self, timeout: float | None) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending and not self._running, timeout)

    def close(self, timeout: float | None) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                key = next(iter(self._pending))
                job = self._pending.pop(key)
                self._running = True
            try:
                job()
                self._report(None)
            except Exception as error:  # never lost silently, never fatal: the conversation stays in memory
                self._report(str(error) or type(error).__name__)
            finally:
                with self._condition:
                    self._running = False
                    self._condition.notify_all()
