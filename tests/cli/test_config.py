"""The TOML config file: defaults, the user config dir, validation."""
from __future__ import annotations

import pytest

from rwkv_chat.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
)
from rwkv_chat.tui.keys import DEFAULT_KEYS
from tests.sample_config import FULL_CONFIG


def test_missing_default_file_gives_the_defaults(user_home):
    assert default_config_path() == user_home / "config" / "config.toml"
    config = load_config()
    assert config == Config() and config.keys == DEFAULT_KEYS and config.source is None


def test_a_full_file_from_the_user_config_dir(user_home, tmp_path):
    path = user_home / "config" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(FULL_CONFIG)
    config = load_config()
    assert config.model.name == "m.pth" and "~" not in str(config.model)
    assert (config.strategy, config.user, config.assistant, config.theme) == ("cpu fp32", "Bob", "Alice", "nord")
    assert config.preamble.startswith("Be brief.")
    assert config.sampling == {"temperature": 0.7, "top_p": 0.3, "top_k": 20, "token_ban": [0], "stop": ["\n\nUser"]}
    assert config.keys["temperature_up"] == "ctrl+up" and config.keys["stop"] == "escape,f10"
    assert config.keys["help"] == "f1" and config.source == path


def test_a_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
