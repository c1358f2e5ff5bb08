"""Config values that used to pass silently are refused, each naming the file, section and key."""
from __future__ import annotations

import pytest

from rwkv_chat.config import MAX_PREAMBLE, ConfigError, load_config
from rwkv_chat.tui.keys import is_key_name


@pytest.mark.parametrize("text, message", [
    ("[modle]\n", "unknown section [modle]"),
    ("[sampling]\ntemprature = 1\n", "unknown name(s) in [sampling]: temprature"),
    ("[sampling]\ntemperature = 9\n", "temperature must be"),
    ("[keys]\nhelp = 'f5'\n", "'f5' is bound to both"),
    ("[keys]\nhelp = ''\n", "must be a key name"),
    ("[chat]\nuser = ''\n", "user must be a non-empty single line"),
    ("[chat]\ntheme = 3\n", "theme must be a string"),
    ("temperature = = 1\n", "not valid TOML"),
    ('[keys]\nsend = "not_a_key+zzz"', "[keys] send: 'not_a_key+zzz' is not a key name"),
    ('[keys]\nstop = "escape,f99"', "[keys] stop: 'f99' is not a key name"),
    ('[keys]\nquit = "ctrl+"', "[keys] quit: 'ctrl+' is not a key name"),
    ('[keys]\nquit = "hyperdrive+q"', "is not a key name"),
    ('[keys]\nquit = 5', "[keys] quit must be a key name"),
    ('[keys]\nfly = "f9"', "unknown name(s) in [keys]: fly"),
    ('[chat]\ntheme = "no-such-theme"', "[chat] theme 'no-such-theme' is not a theme; known: "),
    ('[chat]\npreamble = "' + "x" * (MAX_PREAMBLE + 1) + '"', f"preamble is {MAX_PREAMBLE + 1} characters"),
    ('[chat]\npreamble = "a\\u0000b"', "[chat] preamble contains a NUL character"),
    ('[model]\npath = "a\\u0000b"', "[model] path contains a NUL character"),
    ('[chat]\nuser = "' + "u" * 300 + '"', "at most 200 characters"),
    ('[chat]\nuser = ["Bob"]', "[chat] user must be a string"),
    ("[chat.deep]\nx = 1", "unknown name(s) in [chat]: deep"),
    ("[chat]\nuser = {a = 1}", "[chat] user must be a string"),
    ("[model]\npath = 3", "[model] path must be a string"),
    ("[sampling]\ntemperature = nan", "[sampling]"),
    ("[sampling]\ntop_p = inf", "[sampling]"),
    ('[sampling]\ntemperature = "hot"', "[sampling]"),
    ("chat = 1", "[chat] must be a table"),
])
def test_invalid_values_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_valid_key_names_and_themes_still_load(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[chat]\ntheme = "gruvbox"\npreamble = "' + "p" * MAX_PREAMBLE + '"\n'
                    '[keys]\nsend = "ctrl+shift+enter"\nstop = "escape,question_mark,Q"\nhelp = "f1,?"\n',
                    encoding="utf-8")
    config = load_config(path)
    assert config.theme == "gruvbox" and config.keys["stop"] == "escape,question_mark,q"


@pytest.mark.parametrize("name, ok", [("f5", True), ("f24", True), ("f25", False), ("pageup", True),
                                      ("ctrl+alt+delete", True), ("shift+shift+a", False), ("full_stop", True),
                                      ("plus", True), ("€", True), ("space", True), ("ctrl+ ", False),
                                      ("nonsense_name", False), ("", False)])
def test_key_names_follow_textual(name, ok):
    assert is_key_name(name) is ok


def test_a_huge_wrong_value_is_named_in_a_short_message(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[sampling]\ntemperature = " + "[" * 300 + "1" + "]" * 300 + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert "temperature must be a number" in str(error.value) and len(str(error.value)) < 300
