"""Fuzzing the config file: mutated TOML either loads or raises ConfigError (an RWKVChatError)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rwkv_chat.config import ConfigError, load_config, parse_config
from rwkv_chat.tui.keys import KEY_BINDINGS
from rwkv_chat.sampling import SamplingSettings

from tests.sample_config import FULL_CONFIG

from .conftest import byte_op, fuzz_settings, loads_or_our_error, mutate_bytes

BASE = FULL_CONFIG
NAMES = ["model", "chat", "sampling", "keys", "path", "strategy", "user", "assistant", "preamble", "theme",
         *SamplingSettings.field_names(), *(binding.id for binding in KEY_BINDINGS)]
DEEPLY_NESTED = {"arrays": "[" * 5000 + "]" * 5000, "inline tables": "{a = " * 3000 + "1" + "}" * 3000}
LITERALS = ['""', '"x"', '"\\u0000"', '"' + "a" * 20_000 + '"', '"not_a_key+zzz"', '"ctrl+"', '","', '"f99"',
            '"nord"', '"no-such-theme"', "0", "-1", "1e400", "inf", "nan", "-0.0", "true", "[]", "[1, 2]",
            '["a", 1]', "{}", "{a = 1}", "1979-05-27T07:32:00Z", "99999999999999999999", "0x10", "'single'",
            '"""multi\nline"""', '"ctrl+r,ctrl+r"', '"enter"', '"\\n"', *DEEPLY_NESTED.values()]

line_op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 99), st.sampled_from(NAMES), st.sampled_from(LITERALS)),
    st.tuples(st.just("table"), st.integers(0, 99), st.sampled_from(NAMES + ["x", "keys.send", "chat.deep"])),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("text"), st.integers(0, 99), st.text(max_size=30)),
)


def _mutated(ops) -> str:
    lines = BASE.splitlines()
    for op in ops:
        at = op[1] % (len(lines) + 1)
        if op[0] == "set":
            lines.insert(at, f"{op[2]} = {op[3]}")
        elif op[0] == "table":
            lines.insert(at, f"[{op[2]}]")
        elif op[0] == "delete" and lines:
            del lines[at % len(lines)]
        elif op[0] == "text":
            lines.insert(at, op[2])
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def case_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "config.toml"


def test_unmutated_base_loads(case_file):
    case_file.write_text(BASE)
    assert loads_or_our_error(lambda: load_config(case_file))


@fuzz_settings(1200)
@given(ops=st.lists(line_op, min_size=1, max_size=5))
def test_mutated_config_lines(case_file, ops):
    case_file.write_text(_mutated(ops), encoding="utf-8", errors="surrogatepass")
    loads_or_our_error(lambda: load_config(case_file))


@pytest.mark.parametrize("nesting", DEEPLY_NESTED)
@pytest.mark.parametrize("section", ["", "[sampling]\n"], ids=["top level", "in a section"])
def test_deeply_nested_values_are_a_config_error_naming_the_file(case_file, section, nesting):
    case_file.write_text(f"{section}temperature = {DEEPLY_NESTED[nesting]}\n")
    with pytest.raises(ConfigError) as error:
        load_config(case_file)
    assert str(error.value) == f"{case_file}: not a usable config file (its arrays or tables are nested too deeply)"


@fuzz_settings(400)
@given(ops=st.lists(byte_op, min_size=1, max_size=4))
def test_mutated_config_bytes(case_file, ops):
    case_file.write_bytes(mutate_bytes(BASE.encode(), ops))
    loads_or_our_error(lambda: load_config(case_file))


toml_like = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_subnormal=False),
                                   st.text(max_size=10)),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                         max_leaves=8)


@fuzz_settings(400)
@given(data=st.dictionaries(st.sampled_from(NAMES[:4] + ["x"]),
                            st.dictionaries(st.sampled_from(NAMES), toml_like, max_size=4) | toml_like, max_size=4))
def test_parsed_config_values(data):
    """parse_config over any already-parsed value (what tomllib gives, and more)."""
    loads_or_our_error(lambda: parse_config(data))
