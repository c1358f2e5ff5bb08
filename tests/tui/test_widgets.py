"""Units under the screen: batching of reply text, what the widgets draw."""
from __future__ import annotations

from rwkv_chat.pipeline import GenerationStats
from rwkv_chat.tui.screens.help import key_label
from rwkv_chat.tui.streaming import PieceBatcher
from rwkv_chat.tui.widgets.conversation import printable, stats_line
from rwkv_chat.tui.widgets.settings import format_value, parse_value
from rwkv_chat.tui.widgets.status import StatusInfo, status_text


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batcher_sends_at_most_once_per_interval_and_flushes_the_rest():
    clock, sent = FakeClock(), []
    batcher = PieceBatcher(sent.append, interval=0.1, clock=clock)
    for _ in range(50):  # 50 tokens in 0.25 s
        clock.now += 0.005
        batcher.add("x")
    assert sent == ["x" * 20, "x" * 20]
    batcher.flush()
    assert "".join(sent) == "x" * 50 and len(sent) == 3


def test_batcher_shows_slow_tokens_at_once():
    clock, sent = FakeClock(), []
    batcher = PieceBatcher(sent.append, interval=0.1, clock=clock)
    for piece in ("a", "b", "c"):
        clock.now += 0.5
        batcher.add(piece)
    assert sent == ["a", "b", "c"]


def test_control_characters_are_made_visible():
    assert printable("a\x1b[2Jb\tc\nd\x07\x7f") == "a␛[2Jb\tc\nd␇␡"


def test_stats_line():
    stats = GenerationStats(generated_tokens=42, tokens_per_second=28.04, time_to_first_token=0.123)
    assert stats_line(stats) == "42 tokens, 28.0 tok/s, first token 0.12 s"
    assert stats_line(None) == "" and stats_line(GenerationStats()) == ""


def test_status_text_full_and_compact():
    info = StatusInfo("m.pth", "7", "cpu fp32", 120, 31.5, 0.25, state_file="poet", note="Tiny demo")
    assert str(status_text(info)) == ("m.pth · RWKV v7 · cpu fp32 · state poet · 120 tokens in state · "
                                      "31.5 tok/s · first token 0.25 s\nTiny demo")
    assert "120 tok · 31.5 tok/s · TTFT 0.25s" in str(status_text(info, compact=True))
    busy = StatusInfo("m.pth", "7", "cpu fp32", 5, 31.5, 0.25, busy=True)
    assert "generating" in str(status_text(busy)) and "tok/s" not in str(status_text(busy))
    working = StatusInfo("m.pth", "7", "cpu fp32", 5, 31.5, 0.25, working=True)
    assert "working…" in str(status_text(working)) and "generating" not in str(status_text(working))


def test_setting_values_round_trip():
    assert parse_value("seed", "") is None and format_value("seed", None) == ""
    assert parse_value("top_k", "40") == 40 and parse_value("temperature", "0.7") == 0.7
    assert format_value("temperature", 1.0) == "1" and format_value("penalty_decay", 0.996) == "0.996"
    for name, text in (("top_k", "1.5"), ("temperature", "warm")):
        try:
            parse_value(name, text)
        except ValueError as error:
            assert name.replace("_", " ") in str(error) or name in str(error)
        else:
            raise AssertionError("accepted " + text)


def test_key_labels():
    assert key_label("ctrl+j,shift+enter") == "Ctrl+J / Shift+Enter"
    assert key_label("f5") == "F5"
