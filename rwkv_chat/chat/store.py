"""The conversation history: every conversation kept as it happens, crash-safe.

Layout of the folder (`locations.conversations_dir()`):

    index.sqlite3              SQLite (WAL): one row per conversation: id (uuid), title,
                               created, updated, model, message count, the messages as JSON
                               (for listing, search and Markdown export) and the revision
                               whose state file holds the conversation
    {id}.{rev}.rwkvchat        a complete snapshot (`snapshot.py` format: the conversation as
                               JSON plus the recurrent states), one per revision

Saving writes the revision's file first (atomic, fsynced), then points the index row at it in
one transaction, then removes revisions older than the previous one. A process killed at any
moment therefore leaves the index pointing at a complete file; a row whose file is gone falls
back to the previous revision. The files alone are enough to rebuild the index: a damaged
index is moved aside and rebuilt, and a file the index does not know (a save killed between
the two steps) is adopted. Files that cannot be read are listed with the reason and can be
deleted. Temp files of killed saves are removed when the store opens.

Two processes may use the store at once: each conversation has its own id and its own files;
SQLite serialises the index updates (busy timeout). A conversation open in a session is claimed
(an advisory lock on `.{id}.open`, dropped by the system if the process dies): another process
opening it gets a copy instead, and cannot delete it. A save also names the revision it follows:
if another writer stored the conversation meanwhile (a file system without locks), the save is
refused (StoreConflict) and nothing is written over. A folder that cannot be written opens
read-only: listing and opening work, saving raises StoreError saying why. The folders and the
index are private to the user, like the conversation files.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..demo import model_label
from ..errors import SnapshotError, StoreError
from ..files import release_lock, remove_stale_temp_files, try_lock
from . import locations
from . import snapshot as snapshots

INDEX_NAME = "index.sqlite3"
SUFFIX = snapshots.SUFFIX
BUSY_TIMEOUT_S = 10.0
TITLE_LENGTH = 60
ANY_REVISION = object()  # save(): store whatever revision the index holds now


class StoreConflict(StoreError):
    """Another writer stored the conversation since the revision a save follows."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    custom_title INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT NOT NULL,
    n_messages INTEGER NOT NULL,
    messages TEXT NOT NULL,
    search TEXT NOT NULL,
    rev INTEGER NOT NULL,
    prev_rev INTEGER
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations(updated);
"""


@dataclass(frozen=True)
class ConversationInfo:
    """One entry of the history. `problem` is None when it can be opened, else the reason."""

    id: str
    title: str
    created: datetime | None
    updated: datetime | None
    model_name: str
    n_messages: int
    problem: str | None = None

    @property
    def readable(self) -> bool:
        return self.problem is None

    @property
    def model_label(self) -> str:
        return model_label(self.model_name)

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title,
                "created": self.created.isoformat() if self.created else None,
                "updated": self.updated.isoformat() if self.updated else None,
                "model": self.model_name, "messages": self.n_messages, "problem": self.problem}


def one_line(text) -> str:
    """`text` on one line, its runs of whitespace made single spaces (titles)."""
    return " ".join(str(text).split())


def title_from(messages: list) -> str:
    """The automatic title: the first user message on one line, cut to TITLE_LENGTH characters."""
    first = next((m.get("text", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"), "")
    first = one_line(first)
    if not first:
        return "(empty conversation)"
    return first if len(first) <= TITLE_LENGTH else first[:TITLE_LENGTH - 1] + "…"


def new_conversation_id() -> str:
    return str(uuid.uuid4())


def _parse_name(path: Path) -> tuple[str, int | None]:
    """(id, revision) from "{id}.{rev}.rwkvchat"; revision None for other names."""
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    conversation_id, _, rev = stem.partition(".")
    return conversation_id, int(rev) if rev.isdigit() else None


def _when(seconds) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(seconds)).astimezone()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _check_writable(folder: Path) -> None:
    """Raise OSError unless files can be created in `folder` (created private if missing)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    probe = folder / f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(probe, "wb") as file:
        file.write(b"ok")
    probe.unlink()


def _make_private(path: Path) -> None:
    """Create `path` readable by its owner only, or make it so (it holds every message's text)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass  # not ours to change (another user's file, a read-only system): SQLite says what fails


class ConversationStore:
    """The history in `folder` (default: the user's conversations folder). Safe to share
    between threads; several processes may open the same folder."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder is not None else locations.conversations_dir()
        self.index_path = self.folder / INDEX_NAME
        self.read_only = False
        self.problem: str | None = None  # why the store is read-only or was repaired, for the user
        self._lock = threading.RLock()
        self._last_rev = 0
        self._unreadable: dict[str, str] = {}  # files the index does not know and that cannot be read
        self._claims: dict[str, int] = {}  # conversation id -> the descriptor holding its claim
        self._db: sqlite3.Connection | None = None
        try:
            _check_writable(self.folder)
        except OSError as error:
            self.read_only = True
            self.problem = (f"{self.folder} cannot be written ({error.strerror or error}); "
                            "conversations are not being kept")
        if not self.read_only:
            remove_stale_temp_files(self.folder)
            remove_stale_temp_files(locations.snapshots_dir())
        self._connect()
        self._recover()

    # ------------------------------------------------------------------ opening and repair
    def _connect(self) -> None:
        try:
            self._db = self._open_db()
            self._db.execute("SELECT count(*) FROM conversations").fetchone()
            return
        except sqlite3.OperationalError as error:  # cannot write (full disk, read-only) or no index yet
            self._close_db()
            if self.read_only:
                return
            self.read_only = True
            self.problem = (f"{self.index_path}: the history cannot be written ({error}); "
                            "conversations are not being kept")
        except sqlite3.DatabaseError as error:  # not a database, or a damaged one
            self._close_db()
            if self.read_only:
                if self.index_path.exists():
                    self.problem = (self.problem or "") + f"; the history index is damaged ({error})"
                return
            self._set_aside_damaged_index(error)
        try:
            self._db = self._open_db()
            self._db.execute("SELECT count(*) FROM conversations").fetchone()
        except sqlite3.Error as error:
            self._close_db()
            self.read_only = True
            self.problem = self.problem or (f"{self.index_path}: the history cannot be written ({error}); "
                                            "conversations are not being kept")

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None

    def _open_db(self) -> sqlite3.Connection:
        if self.read_only:
            if not self.index_path.exists():
                raise sqlite3.OperationalError("no index yet")
            db = sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                                 check_same_thread=False, isolation_level=None)
            try:
                db.execute("SELECT count(*) FROM conversations").fetchone()
                return db
            except sqlite3.OperationalError:  # a WAL index on a read-only file system: no -shm file can be made
                db.close()
            return sqlite3.connect(f"file:{self.index_path}?immutable=1", uri=True,
                                   check_same_thread=False, isolation_level=None)
        _make_private(self.index_path)  # SQLite creates its -wal and -shm files with the index's permissions
        db = sqlite3.connect(self.index_path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(_SCHEMA)
        return db

    def _set_aside_damaged_index(self, error: Exception) -> None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            path = self.folder / (INDEX_NAME + suffix)
            if path.exists():
                try:
                    os.replace(path, self.folder / f"{INDEX_NAME}{suffix}.damaged-{stamp}")
                except OSError:
                    path.unlink(missing_ok=True)
        self.problem = f"the history index was damaged ({error}); it was rebuilt from the conversation files"

    def _recover(self) -> None:
        """Adopt conversation files the index does not know; remember the unreadable ones."""
        files = self._files_by_id()
        known = self._known_ids()
        for conversation_id, paths in files.items():
            if conversation_id in known:
                continue
            problem = None
            for path in paths:  # newest revision first
                try:
                    data = snapshots.read_snapshot_data(path)
                except SnapshotError as error:
                    problem = problem or str(error).removeprefix(f"{path}: ")
                    continue
                if self._db is not None and not self.read_only:
                    try:
                        self._adopt(conversation_id, path, data)
                        problem = None
                        break
                    except (sqlite3.Error, ValueError, TypeError) as error:
                        problem = f"could not be indexed ({error})"
                        continue
                problem = "not in the history index (read-only folder)"
                break
            if problem is not None:
                self._unreadable[conversation_id] = problem

    def _files_by_id(self) -> dict[str, list[Path]]:
        try:
            entries = [p for p in self.folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")]
        except OSError:
            return {}
        files: dict[str, list[Path]] = {}
        for path in entries:
            files.setdefault(_parse_name(path)[0], []).append(path)
        for paths in files.values():
            paths.sort(key=lambda p: _parse_name(p)[1] or -1, reverse=True)
        return files

    def _known_ids(self) -> set[str]:
        if self._db is None:
            return set()
        with self._lock:
            try:
                return {row[0] for row in self._db.execute("SELECT id FROM conversations")}
            except sqlite3.Error:
                return set()

    def _adopt(self, conversation_id: str, path: Path, data: dict) -> None:
        meta = data.get("conversation") if isinstance(data.get("conversation"), dict) else {}
        rev = _parse_name(path)[1]
        if rev is None:  # a file not named by revision: give it one
            rev = self._next_rev()
            target = self.folder / f"{conversation_id}.{rev}{SUFFIX}"
            os.replace(path, target)
        saved_at = snapshots._parse_time(data.get("saved_at"))
        updated = saved_at.timestamp() if saved_at else path.stat().st_mtime
        custom = bool(meta.get("custom_title"))
        title = str(meta.get("title")) if custom and meta.get("title") else title_from(data["messages"])
        created = meta.get("created") if isinstance(meta.get("created"), (int, float)) else updated
        self._upsert(conversation_id, title, custom, created, updated, data, rev)

    # ------------------------------------------------------------------ saving
    def _next_rev(self) -> int:
        with self._lock:
            self._last_rev = max(time.time_ns(), self._last_rev + 1)
            return self._last_rev

    def _require_writable(self) -> None:
        if self.read_only or self._db is None:
            raise StoreError(self.problem or f"{self.folder}: the history cannot be written")

    def save(self, conversation_id: str, data: dict, states: dict, *, title: str | None = None,
             created: float | None = None, expect_rev=ANY_REVISION) -> int:
        """Store a conversation (`data` and `states` as `snapshot.write_snapshot` takes them) and
        return its new revision. `title` None keeps a title the user gave, else uses the first
        message. `expect_rev`: the revision the caller last stored or loaded (None: it never
        stored this one); StoreConflict when the index holds another, and nothing is changed.
        StoreError when it cannot be stored; the previously stored copy is then intact."""
        self._require_writable()
        created = time.time() if created is None else created
        rev = self._next_rev()
        document = {**data, "conversation": {"id": conversation_id, "title": title, "custom_title": title is not None,
                                             "created": created}}
        path = self.folder / f"{conversation_id}.{rev}{SUFFIX}"
        try:
            snapshots.write_snapshot(path, document, states)
        except SnapshotError as error:
            raise StoreError(f"could not store the conversation: {error}") from error
        try:
            previous = self._upsert(conversation_id, title, title is not None, created, time.time(), document, rev,
                                    expect_rev)
        except StoreConflict:
            path.unlink(missing_ok=True)
            raise
        except sqlite3.Error as error:
            path.unlink(missing_ok=True)
            raise StoreError(f"{self.index_path}: could not update the history index ({error})") from error
        self._unreadable.pop(conversation_id, None)
        self._remove_old_revisions(conversation_id, keep={rev, previous})
        return rev

    def _upsert(self, conversation_id: str, title: str | None, custom: bool, created: float, updated: float,
                data: dict, rev: int, expect_rev=ANY_REVISION) -> int | None:
        """Point the index row at revision `rev`; returns the revision it pointed at before."""
        messages = [m for m in data.get("messages", []) if isinstance(m, dict)]
        auto_title = title_from(messages)
        search = "\n".join(str(m.get("text", "")) for m in messages).lower()
        model = str((data.get("model") or {}).get("name", ""))
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT rev, title, custom_title, created FROM conversations WHERE id = ?",
                                 (conversation_id,)).fetchone()
                previous = row[0] if row else None
                if expect_rev is not ANY_REVISION and previous != expect_rev:
                    raise StoreConflict(f"conversation {conversation_id} was stored by another rwkv-chat meanwhile")
                if title is None and row and row[2]:
                    title, custom = row[1], True
                db.execute(
                    "INSERT OR REPLACE INTO conversations (id, title, custom_title, created, updated, model, "
                    "n_messages, messages, search, rev, prev_rev) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, title or auto_title, int(custom), row[3] if row else created, updated, model,
                     len(messages), json.dumps(messages, ensure_ascii=False), search, rev, previous),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return previous

    def _remove_old_revisions(self, conversation_id: str, keep: set) -> None:
        """Every revision but the ones kept, up to the newest kept one (a newer file may be a
        save still under way)."""
        keep = {rev for rev in keep if rev is not None}
        newest_kept = max(keep)
        for path in self._files_by_id().get(conversation_id, []):
            rev = _parse_name(path)[1]
            if rev is not None and rev not in keep and rev < newest_kept:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def list(self, search: str | None = None) -> list[ConversationInfo]:
        """Every conversation, most recently updated first; `search` keeps those whose title or
        messages contain it (case-insensitive). Unreadable entries come last, with the reason."""
        needle = (search or "").strip().lower()
        rows = []
        if self._db is not None:
            query = "SELECT id, title, created, updated, model, n_messages, rev, prev_rev FROM conversations"
            arguments: tuple = ()
            if needle:
                query += " WHERE instr(search, ?) > 0 OR instr(lower(title), ?) > 0"
                arguments = (needle, needle)
            with self._lock:
                try:
                    rows = self._db.execute(query + " ORDER BY updated DESC", arguments).fetchall()
                except sqlite3.Error as error:
                    raise StoreError(f"{self.index_path}: cannot read the history ({error})") from error
        infos = []
        for cid, title, created, updated, model, n_messages, rev, prev_rev in rows:
            problem = None
            if not self._revision_path(cid, rev).exists() and (prev_rev is None
                                                               or not self._revision_path(cid, prev_rev).exists()):
                problem = f"its state file {self._revision_path(cid, rev).name} is missing"
            infos.append(ConversationInfo(cid, title, _when(created), _when(updated), model, n_messages, problem))
        if not needle:
            for cid, problem in sorted(self._unreadable.items()):
                infos.append(ConversationInfo(cid, cid, None, None, "", 0, problem))
        return infos

    def most_recent(self) -> ConversationInfo | None:
        return next((info for info in self.list() if info.readable), None)

    def _revision_path(self, conversation_id: str, rev: int) -> Path:
        return self.folder / f"{conversation_id}.{rev}{SUFFIX}"

    def _row(self, conversation_id: str):
        if self._db is None:
            raise StoreError(f"no conversation {conversation_id} in the history")
        with self._lock:
            try:
                row = self._db.execute("SELECT title, rev, prev_rev, messages, model, created, updated "
                                       "FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            except sqlite3.Error as error:
                raise StoreError(f"{self.index_path}: cannot read the history ({error})") from error
        if row is None:
            raise StoreError(f"no conversation {conversation_id} in the history")
        return row

    def resolve(self, prefix: str) -> str:
        """The id of the one conversation whose id starts with `prefix`; StoreError otherwise."""
        prefix = prefix.strip()
        ids = [cid for cid in self._known_ids() | set(self._unreadable) if cid.startswith(prefix)] if prefix else []
        if len(ids) != 1:
            problem = "no conversation" if not ids else f"{len(ids)} conversations"
            raise StoreError(f"{problem} with an id starting with {prefix!r} (rwkv-chat history lists them)")
        return ids[0]

    def load(self, conversation_id: str) -> tuple[snapshots.SnapshotFile, str | None]:
        """(the conversation as a snapshot file, the user's title or None). Falls back to the
        previous revision when the newest one is missing or damaged; StoreError when none reads."""
        return self.load_with_revision(conversation_id)[:2]

    def load_with_revision(self, conversation_id: str) -> tuple[snapshots.SnapshotFile, str | None, int]:
        """`load`, and the revision the index pointed at (what a later save names as `expect_rev`)."""
        title, rev, prev_rev = self._row(conversation_id)[:3]
        candidates = [self._revision_path(conversation_id, rev)]
        if prev_rev is not None:
            candidates.append(self._revision_path(conversation_id, prev_rev))
        problems = []
        for path in candidates:
            if not path.exists():
                problems.append(f"{path.name} is missing")
                continue
            try:
                file = snapshots.read_snapshot(path)
            except SnapshotError as error:
                problems.append(str(error))
                continue
            return file, title if self._custom(conversation_id) else None, rev
        raise StoreError(f"conversation {title!r} cannot be opened: " + "; ".join(problems))

    def _custom(self, conversation_id: str) -> bool:
        with self._lock:
            try:
                row = self._db.execute("SELECT custom_title FROM conversations WHERE id = ?",
                                       (conversation_id,)).fetchone()
            except sqlite3.Error:
                return False
        return bool(row and row[0])

    def messages(self, conversation_id: str) -> list[dict]:
        return json.loads(self._row(conversation_id)[3])

    def markdown(self, conversation_id: str) -> str:
        title, _rev, _prev, messages, model, created, updated = self._row(conversation_id)
        return conversation_markdown(title, json.loads(messages), model, _when(updated))

    # ------------------------------------------------------------------ changing
    def rename(self, conversation_id: str, title: str) -> None:
        title = one_line(title)
        if not title:
            raise StoreError("the title cannot be empty")
        self._require_writable()
        self._row(conversation_id)
        with self._lock:
            try:
                self._db.execute("UPDATE conversations SET title = ?, custom_title = 1 WHERE id = ?",
                                 (title, conversation_id))
            except sqlite3.Error as error:
                raise StoreError(f"{self.index_path}: could not rename ({error})") from error

    def delete(self, conversation_id: str) -> None:
        """Remove a conversation (its row and all its files), readable or not. StoreError when
        another rwkv-chat has it open."""
        self.hold(conversation_id)
        try:
            with self._lock:
                try:
                    self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
                except sqlite3.Error as error:
                    raise StoreError(f"{self.index_path}: could not delete ({error})") from error
            for path in self._files_by_id().get(conversation_id, []):
                try:
                    path.unlink(missing_ok=True)
                except OSError as error:
                    raise StoreError(f"{path}: could not delete ({error.strerror or error})") from error
            self._unreadable.pop(conversation_id, None)
            self._claim_path(conversation_id).unlink(missing_ok=True)
        finally:
            self.release(conversation_id)

    # ------------------------------------------------------------------ claims
    def _claim_path(self, conversation_id: str) -> Path:
        return self.folder / f".{conversation_id}.open"

    def claim(self, conversation_id: str) -> bool:
        """Mark the conversation open here until `release` (or this process ends). False when
        another session (another rwkv-chat, or another store in this process) has it. Where no
        claim can be made (a read-only folder) the answer is True: saving is refused there anyway."""
        with self._lock:
            if conversation_id in self._claims or self.read_only:
                return True
            try:
                fd = try_lock(self._claim_path(conversation_id))
            except OSError:
                return True
            if fd is None:
                return False
            self._claims[conversation_id] = fd
            return True

    def hold(self, conversation_id: str) -> None:
        """Claim the conversation for a change no other session may see happen (a delete);
        StoreError naming the problem when another rwkv-chat has it open."""
        self._require_writable()
        if not self.claim(conversation_id):
            raise StoreError(f"conversation {conversation_id[:8]} is open in another rwkv-chat window; "
                             "close it there (or start a new conversation there) first")

    def release(self, conversation_id: str) -> None:
        with self._lock:
            fd = self._claims.pop(conversation_id, None)
        if fd is not None:
            release_lock(fd)

    def export_snapshot(self, conversation_id: str, path: str | os.PathLike) -> Path:
        """Write the conversation as a single shareable .rwkvchat file (never replacing one)."""
        file, title = self.load(conversation_id)
        data = {key: value for key, value in file.data.items() if key not in ("format", "format_version", "saved_at")}
        meta = data.get("conversation") if isinstance(data.get("conversation"), dict) else {}
        data["conversation"] = {**meta, "title": title, "custom_title": title is not None}  # renamed since stored
        return snapshots.write_snapshot(path, data, file.states, new_file=True)

    def import_snapshot(self, path: str | os.PathLike) -> str:
        """Store a .rwkvchat file as a new conversation (with the title its user gave it, if any);
        returns its id."""
        file = snapshots.read_snapshot(path)
        data = {key: value for key, value in file.data.items() if key not in ("format", "format_version", "saved_at",
                                                                               "conversation")}
        meta = file.data.get("conversation") if isinstance(file.data.get("conversation"), dict) else {}
        title = one_line(meta["title"]) if meta.get("custom_title") and isinstance(meta.get("title"), str) else None
        conversation_id = new_conversation_id()
        self.save(conversation_id, data, file.states, title=title or None)
        return conversation_id

    def close(self) -> None:
        for conversation_id in list(self._claims):
            self.release(conversation_id)
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def conversation_markdown(title: str, messages: list[dict], model: str = "", updated: datetime | None = None) -> str:
    """A conversation as Markdown: a heading, one line of facts, then each message."""
    lines = [f"# {title}", ""]
    facts = [part for part in (model and f"model {model}", updated and updated.strftime("%Y-%m-%d %H:%M")) if part]
    if facts:
        lines += [f"*{' · '.join(facts)}*", ""]
    for message in messages:
        role = "User" if message.get("role") == "user" else "Assistant"
        lines += [f"**{role}:**", "", str(message.get("text", "")), ""]
    return "\n".join(lines)
