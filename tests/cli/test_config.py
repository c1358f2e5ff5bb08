"""The TOML config file: defaults, the user config dir, validation."""
from __future__ import annotations

import pytest

from rwkv_chat.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
)
from rwkv_chat.errors import RWKVChatError
from rwkv_chat.tui.keys import DEFAULT_KEYS


def test_missing_default_file_gives_the_defaults(user_home):
    assert default_config_path() == user_home / "config" / "config.toml"
    config = load_config()
    assert config == Config() and config.keys == DEFAULT_KEYS and config.source is None


def test_a_full_file_from_the_user_config_dir(user_home, tmp_path):
    path = user_home / "config" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("""
[model]
path = "~/models/m.pth"
strategy = "cuda fp16"
[chat]
user = "Bob"
assistant = "Alice"
preamble = "Be brief."
theme = "nord"
[sampling]
temperature = 0.7
top_k = 20
[keys]
temperature_up = "ctrl+up"
stop = "Escape, F10"
""")
    config = load_config()
    assert config.model.name == "m.pth" and "~" not in str(config.model)
    assert (config.strategy, config.user, config.assistant, config.theme) == ("cuda fp16", "Bob", "Alice", "nord")
    assert config.sampling == {"temperature": 0.7, "top_k": 20}
    assert config.keys["temperature_up"] == "ctrl+up" and config.keys["stop"] == "escape,f10"
    assert config.keys["help"] == "f1" and config.source == path


@pytest.mark.parametrize(("text", "message"), [
    ("[modle]\n", "unknown section [modle]"),
    ("[sampling]\ntemprature = 1\n", "unknown name(s) in [sampling]: temprature"),
    ("[sampling]\ntemperature = 9\n", "temperature must be"),
    ("[keys]\nhelp = 'f5'\n", "'f5' is bound to both"),
    ("[keys]\nhelp = ''\n", "must be a key name"),
    ("[chat]\nuser = ''\n", "user must be a non-empty single line"),
    ("[chat]\ntheme = 3\n", "theme must be a string"),
    ("temperature = = 1\n", "not valid TOML"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert isinstance(caught.value, RWKVChatError)


def test_a_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
