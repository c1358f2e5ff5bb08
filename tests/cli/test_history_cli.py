"""`rwkv-chat history` (list, --json, -s, export, import, delete) and `rwkv-chat --continue`."""
from __future__ import annotations

import json

import pytest

from rwkv_chat.chat.snapshot import read_snapshot_data
from rwkv_chat.chat.store import ConversationStore
from rwkv_chat.cli import ExitCode, cli



def invoke(runner, *args):
    return runner.invoke(cli, list(map(str, args)), catch_exceptions=False)


@pytest.fixture
def stored(model_path, user_home):
    """Two stored conversations with the tiny model: ids (older, newer)."""
    from rwkv_chat import RWKV, Pipeline
    from rwkv_chat.chat.session import ChatSession
    from rwkv_chat.sampling import SamplingSettings

    pipe = Pipeline(RWKV(model_path, progress=None))
    store = ConversationStore()
    ids = []
    for texts in (["a poem about rain"], ["What is RWKV?", "and then?"]):
        session = ChatSession(pipe, SamplingSettings(max_tokens=3))
        session.attach_store(store)
        for text in texts:
            list(session.send(text))
        session.close()
        ids.append(session.conversation_id)
    store.close()
    return ids


def test_history_lists_newest_first_and_searches(runner, stored):
    result = invoke(runner, "history")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line[:8] for line in lines] == [stored[1][:8], stored[0][:8]]
    assert "What is RWKV?" in lines[0] and "4 msgs" in lines[0] and "tiny-v7.pth" in lines[0]

    as_json = [json.loads(line) for line in invoke(runner, "history", "--json", "-s", "RAIN").output.splitlines()]
    assert [(e["id"], e["title"], e["messages"]) for e in as_json] == [(stored[0], "a poem about rain", 2)]


def test_history_is_empty_at_first(runner):
    result = invoke(runner, "history")
    assert result.exit_code == 0 and "No conversations yet" in result.stderr


def test_export_markdown_and_snapshot_then_import_and_delete(runner, stored, tmp_path):
    newer = stored[1]
    result = invoke(runner, "history", "export", newer[:6], tmp_path / "chat.md")
    assert result.exit_code == 0
    markdown = (tmp_path / "chat.md").read_text()
    assert markdown.startswith("# What is RWKV?") and "and then?" in markdown

    invoke(runner, "history", "export", newer[:6], tmp_path / "chat.rwkvchat")
    data = read_snapshot_data(tmp_path / "chat.rwkvchat")
    assert [m["text"] for m in data["messages"]][::2] == ["What is RWKV?", "and then?"]

    imported = invoke(runner, "history", "import", tmp_path / "chat.rwkvchat").output.strip()
    assert imported not in stored and len(ConversationStore().list()) == 3

    result = runner.invoke(cli, ["history", "delete", newer[:6]], input="n\n")
    assert result.exit_code == 1 and "Delete " + newer[:8] + " 'What is RWKV?' (4 messages)?" in result.stderr
    assert len(ConversationStore().list()) == 3  # asked, kept
    result = runner.invoke(cli, ["history", "delete", newer], input="y\n")
    assert result.exit_code == 0 and "Deleted" in result.output
    assert {info.id for info in ConversationStore().list()} == {stored[0], imported}
    result = invoke(runner, "history", "delete", imported[:6], "--yes")
    assert result.exit_code == 0 and [info.id for info in ConversationStore().list()] == [stored[0]]


def test_an_imported_conversation_keeps_the_title_its_user_gave(runner, stored, tmp_path):
    store = ConversationStore()
    store.rename(stored[0], "Rain")
    invoke(runner, "history", "export", stored[0][:6], tmp_path / "rain.rwkvchat")
    imported = invoke(runner, "history", "import", tmp_path / "rain.rwkvchat").output.strip()
    assert {i.id: i.title for i in ConversationStore().list()}[imported] == "Rain"
    store.close()


def test_an_unknown_or_ambiguous_id_is_a_clean_error(runner, stored):
    result = runner.invoke(cli, ["history", "delete", "zzzz"])
    assert result.exit_code == ExitCode.BAD_INPUT and "no conversation" in result.stderr
    result = runner.invoke(cli, ["history", "export", "", "x.md"])
    assert result.exit_code == ExitCode.BAD_INPUT


def test_continue_reopens_the_most_recent_conversation_and_keeps_storing_it(runner, stored, fake_app):  # noqa: F811
    result = invoke(runner, "--continue")
    assert result.exit_code == 0
    (app,) = fake_app.made
    session = app.session
    assert session.conversation_id == stored[1]
    assert [m.text for m in session.messages][::2] == ["What is RWKV?", "and then?"]
    assert session.store is not None
    list(session.send("third"))
    session.close()
    assert ConversationStore().list()[0].n_messages == 6


def test_continue_without_any_conversation_says_so(runner, model_path, fake_app):  # noqa: F811
    result = runner.invoke(cli, ["-c", "-m", str(model_path)])
    assert result.exit_code != 0 and "no conversation to continue" in result.output + result.stderr
    assert fake_app.made == []


def test_a_new_chat_is_stored(runner, model_path, fake_app):  # noqa: F811
    result = invoke(runner, "-m", model_path)
    assert result.exit_code == 0
    session = fake_app.made[0].session
    list(session.send("remember me"))
    session.close()
    assert [info.title for info in ConversationStore().list()] == ["remember me"]


def test_the_demo_model_is_listed_as_the_demo_model():
    from rwkv_chat.chat.store import ConversationInfo

    demo = ConversationInfo("c0ffee00", "hi", None, None, "rwkv7-demo-bc4bd267c93bbcaa.pth", 2)
    mine = ConversationInfo("c0ffee01", "hi", None, None, "RWKV-x070-World-1.5B.pth", 2)
    assert (demo.model_label, mine.model_label) == ("demo model", "RWKV-x070-World-1.5B.pth")
    assert demo.to_dict()["model"] == "rwkv7-demo-bc4bd267c93bbcaa.pth"  # scripts get the file name
