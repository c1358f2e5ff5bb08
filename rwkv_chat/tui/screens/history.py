"""The history screen (Ctrl+O): every stored conversation and every exported snapshot file.

Each entry shows its title, date, model and message count; unreadable ones say why. Enter
opens, F2 renames, Ctrl+E exports to Markdown, Delete asks and a second Delete deletes, Ctrl+F
searches the text of the messages, Esc closes. Every disk access runs in a thread
worker, and every failure is a notification: the dialog and the conversation stay.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from ...chat import locations
from ...chat import snapshot as snapshots
from ...chat.store import conversation_markdown, title_from
from ...demo import model_label
from ...errors import RWKVChatError
from ...files import write_new_file


@dataclass(frozen=True)
class HistoryEntry:
    """One line of the list: a stored conversation (`conversation_id`) or a snapshot file (`path`)."""

    title: str
    when: datetime | None
    model: str
    n_messages: int
    conversation_id: str | None = None
    path: Path | None = None
    problem: str | None = None

    @property
    def key(self) -> str:
        return self.conversation_id or str(self.path)

    @property
    def name(self) -> str:
        return self.title if self.conversation_id else Path(self.path).name


def when_label(when) -> str:
    if isinstance(when, datetime):
        return when.strftime("%Y-%m-%d %H:%M")
    return str(when or "")[:16].replace("T", " ")


def entry_prompt(entry: HistoryEntry) -> Text:
    title = entry.title if len(entry.title) <= 60 else entry.title[:59] + "…"
    text = Text()
    if entry.problem is not None:
        text.append("unreadable ", style="bold red")
        text.append(f"{entry.name}\n")
        text.append(f"  {entry.problem}", style="dim")
        return text
    text.append(when_label(entry.when) or "----------------", style="bold")
    text.append(f"  {title}\n")
    where = "" if entry.conversation_id else f" · file {Path(entry.path).name}"
    text.append(f"  {entry.n_messages} messages · {entry.model}{where}", style="dim")
    return text


def load_entries(store, search: str = "", snapshot_folder: Path | None = None) -> list[HistoryEntry]:
    """The stored conversations (newest first), then the snapshot files (readable ones matching
    `search`, then the unreadable ones when not searching). Raises RWKVChatError."""
    entries = []
    if store is not None:
        for info in store.list(search):
            entries.append(HistoryEntry(info.title, info.updated, info.model_label, info.n_messages,
                                        conversation_id=info.id, problem=info.problem))
    infos, unreadable = snapshots.scan_snapshots(snapshot_folder)
    needle = search.strip().lower()
    for info in infos:
        if needle and needle not in info.first_message.lower() and needle not in info.path.name.lower():
            continue
        entries.append(HistoryEntry(title_from([{"role": "user", "text": info.first_message}]), info.saved_at,
                                    model_label(info.model_name), info.n_messages, path=info.path))
    if not needle:
        for path, problem in unreadable:
            entries.append(HistoryEntry(path.name, None, "", 0, path=path, problem=problem))
    return entries


def entry_markdown(store, entry: HistoryEntry) -> str:
    if entry.conversation_id is not None:
        return store.markdown(entry.conversation_id)
    data = snapshots.read_snapshot_data(entry.path)
    messages = [m for m in data["messages"] if isinstance(m, dict)]
    return conversation_markdown(entry.title, messages, str(data["model"].get("name", "")), entry.when)


def export_markdown(store, entry: HistoryEntry, folder: Path | None = None) -> Path:
    """Write the entry as Markdown to a new file in `folder` (default: the exports folder)."""
    text = entry_markdown(store, entry)
    folder = folder or locations.exports_dir()
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in entry.title)[:40].strip("-") or "conversation"
    try:
        return write_new_file(folder / f"{stem}.md", lambda temp: temp.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise OSError(f"{folder}: cannot write the Markdown file ({error.strerror or error})") from error


class RenameDialog(ModalScreen[str | None]):
    """One line to type the new title; Enter keeps it, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="rename_cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.current = title

    def compose(self):
        with Vertical(id="rename-box") as box:
            box.border_title = "Rename the conversation"
            box.border_subtitle = "Enter keep · Esc cancel"
            yield Input(self.current, id="rename-input")

    def on_mount(self) -> None:
        self.query_one("#rename-input").focus()

    @on(Input.Submitted, "#rename-input")
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value if event.value.strip() else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HistoryScreen(ModalScreen[HistoryEntry | None]):
    """Lists the history; Enter returns the chosen entry (the chat screen opens it), Esc None."""

    BINDINGS = [
        Binding("escape", "cancel", "Close", id="history_cancel"),
        Binding("delete", "delete", "Delete", id="history_delete"),
        Binding("f2", "rename", "Rename", id="history_rename"),
        Binding("ctrl+e", "export", "Export .md", id="history_export"),
        Binding("ctrl+f", "search", "Search", id="history_search"),
    ]
    HINT = "Enter open · F2 rename · Ctrl+E export .md · Del delete · Ctrl+F search · Esc"

    def __init__(self, store, *, snapshot_folder: Path | None = None, current_id: str | None = None,
                 on_renamed=None) -> None:
        super().__init__()
        self.store = store
        self.snapshot_folder = snapshot_folder
        self.current_id = current_id
        self.on_renamed = on_renamed  # called with (id, title) after a rename
        self.entries: list[HistoryEntry] = []
        self.armed: str | None = None  # the key of the entry a second Delete removes
        self.loaded = False

    def compose(self):
        with Vertical(id="history-box") as box:
            box.border_title = "Conversations"
            box.border_subtitle = self.HINT
            yield Input(placeholder="Search the messages (Ctrl+F)", id="history-search")
            yield OptionList(id="history-list")
            yield Static("Loading…", id="history-empty")

    def on_mount(self) -> None:
        self.query_one("#history-list").display = False
        self.reload()

    # ------------------------------------------------------------------ loading
    def reload(self) -> None:
        self.load(self.query_one("#history-search", Input).value)

    @work(thread=True, exclusive=True, group="history-load", exit_on_error=False)
    def load(self, search: str) -> None:
        try:
            entries, problem = load_entries(self.store, search, self.snapshot_folder), None
        except (RWKVChatError, OSError) as error:
            entries, problem = [], str(error)
        except Exception as error:  # never an endless empty list: say what went wrong
            entries, problem = [], f"unexpected {type(error).__name__}: {error} (a bug in rwkv-chat)"
        self.app.call_from_thread(self._show, entries, problem, search)

    def _show(self, entries: list[HistoryEntry], problem: str | None, search: str) -> None:
        options = self.query_one("#history-list", OptionList)
        highlighted = self.highlighted
        self.entries = entries
        options.clear_options()
        options.add_options([Option(entry_prompt(entry), id=str(index)) for index, entry in enumerate(entries)])
        options.display = bool(entries)
        empty = self.query_one("#history-empty", Static)
        empty.display = not entries
        if problem is not None:
            empty.update(f"The history cannot be read: {problem}")
        elif search.strip():
            empty.update(f"No conversation contains {search.strip()!r}.")
        else:
            empty.update("No conversations yet. Every conversation is kept here as you chat.")
        if entries:
            keys = [entry.key for entry in entries]
            options.highlighted = keys.index(highlighted.key) if highlighted and highlighted.key in keys else 0
            if self.focused is None or self.focused is options or not self.loaded:
                options.focus()
        self.loaded = True
        self._disarm()

    @property
    def highlighted(self) -> HistoryEntry | None:
        options = self.query_one("#history-list", OptionList)
        if options.highlighted is None or not self.entries or options.highlighted >= len(self.entries):
            return None
        return self.entries[options.highlighted]

    # ------------------------------------------------------------------ search
    @on(Input.Changed, "#history-search")
    def _search_changed(self) -> None:
        self.reload()

    @on(Input.Submitted, "#history-search")
    def _search_done(self) -> None:
        self.query_one("#history-list").focus()

    def action_search(self) -> None:
        self.query_one("#history-search").focus()

    # ------------------------------------------------------------------ actions
    @on(OptionList.OptionSelected, "#history-list")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        entry = self.entries[int(event.option.id)]
        if entry.problem is not None:
            self.notify(f"{entry.name}: {entry.problem}. Del deletes it.", title="Cannot open", severity="warning")
            return
        self.dismiss(entry)

    @on(OptionList.OptionHighlighted, "#history-list")
    def _moved(self) -> None:
        entry = self.highlighted
        if entry is None or entry.key != self.armed:
            self._disarm()

    def _disarm(self) -> None:
        self.armed = None
        self.query_one("#history-box").border_subtitle = self.HINT

    def action_delete(self) -> None:
        entry = self.highlighted
        if entry is None or self.focused is self.query_one("#history-search"):
            return
        if entry.conversation_id is not None and entry.conversation_id == self.current_id:
            self.notify("This is the open conversation; start a new one (Ctrl+N) to delete it.", severity="warning")
            return
        if self.armed != entry.key:
            self.armed = entry.key
            self.query_one("#history-box").border_subtitle = f"Del again deletes {entry.name[:40]} · any other key keeps it"
            return
        self._disarm()
        self.delete_entry(entry)

    @work(thread=True, group="history-disk", exit_on_error=False)
    def delete_entry(self, entry: HistoryEntry) -> None:
        try:
            if entry.conversation_id is not None:
                self.store.delete(entry.conversation_id)
            else:
                Path(entry.path).unlink()
        except (RWKVChatError, OSError) as error:
            self.app.call_from_thread(self.notify, str(error), title="Could not delete", severity="error")
            return
        self.app.call_from_thread(self.notify, f"Deleted {entry.name}")
        self.app.call_from_thread(self.reload)

    def action_rename(self) -> None:
        entry = self.highlighted
        if entry is None:
            return
        if entry.conversation_id is None or entry.problem is not None or self.store is None:
            self.notify("Only conversations in the history can be renamed.", severity="warning")
            return
        self.app.push_screen(RenameDialog(entry.title), lambda title: title and self.rename_entry(entry, title))

    @work(thread=True, group="history-disk", exit_on_error=False)
    def rename_entry(self, entry: HistoryEntry, title: str) -> None:
        try:
            self.store.rename(entry.conversation_id, title)
        except (RWKVChatError, OSError) as error:
            self.app.call_from_thread(self.notify, str(error), title="Could not rename", severity="error")
            return
        if self.on_renamed is not None:
            self.app.call_from_thread(self.on_renamed, entry.conversation_id, " ".join(title.split()))
        self.app.call_from_thread(self.reload)

    def action_export(self) -> None:
        entry = self.highlighted
        if entry is None:
            return
        if entry.problem is not None:
            self.notify(f"{entry.name}: {entry.problem}", title="Cannot export", severity="warning")
            return
        self.export_entry(entry)

    @work(thread=True, group="history-disk", exit_on_error=False)
    def export_entry(self, entry: HistoryEntry) -> None:
        try:
            path = export_markdown(self.store, entry)
        except (RWKVChatError, OSError, KeyError, TypeError, ValueError) as error:
            self.app.call_from_thread(self.notify, str(error), title="Could not export", severity="error")
            return
        self.app.call_from_thread(self.notify, f"Exported to {path}", title="Markdown written")

    def action_cancel(self) -> None:
        self.dismiss(None)
