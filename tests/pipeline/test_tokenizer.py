"""World tokenizer: id parity with the reference TRIE_TOKENIZER (rwkv==0.8.32), both backends."""
import random
import sys
from pathlib import Path

import pytest

from rwkv_chat.errors import RWKVChatError

from rwkv_chat.tokenizer import PURE_ENV_VAR, StreamDecoder, Tokenizer

WHEEL = "pyrwkv-tokenizer"
PURE = "python"

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45 PM; costs $12.50!\n",
    "latin_accents": "Le café naïve, résumé, Straße, Ångström, ﬁ ligature, ½ ¾.\n",
    "chinese": "机器学习是人工智能的一个分支。我们今天去北京大学吧，好吗？\n",
    "japanese": "日本語のテキストです。カタカナとひらがな、そして漢字を混ぜます。ｶﾀｶﾅ\n",
    "korean_greek_hindi_thai": "한국어 텍스트. Ελληνικά κείμενα. हिन्दी पाठ। ภาษาไทย\n",
    "arabic": "مرحبا بالعالم، هذه جملة باللغة العربية. \u200fالنص\u200e\n",
    "russian": "Привет, мир! Это тест токенизатора. Ёлка.\n",
    "emoji_zwj": "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 \U0001f44d\U0001f3fd "
    "\U0001f3f3\ufe0f\u200d\U0001f308 \u2764\ufe0f \U0001f1ef\U0001f1f5 \U0001f9d1\U0001f3ff\u200d\U0001f680\n",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353\u0354 \u1100\u1161\u11a8\n",
    "control": "".join(map(chr, range(0x20)))
    + "\x7f\x80\x9f\ufeff\u200b\u2028\ufffe\uffff\U0010ffff",
    "crlf_tabs": "line one\r\nline two\r\n\ttab\t\tdouble\r\n\r\n\n\n\n",
    "whitespace_runs": "a" + " " * 100 + "b" + "\t" * 40 + "c" + "\n" * 30 + " \n \n"
    + "\u3000" * 9,
    "code": "def f(x):\n    return {'k': [x ** 2 for _ in range(10)]}  # comment\n",
    "repeats": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!!!!!!!!!!!=========------",
}


def random_code_point(rng: random.Random) -> str:
    while True:
        code_point = rng.randrange(rng.choice([0x80, 0x800, 0x110000]))
        if not 0xD800 <= code_point <= 0xDFFF:
            return chr(code_point)


def random_text(rng: random.Random, pieces: int) -> str:
    """Sample sentences, single random code points and short runs of one character."""
    sample_texts = list(SAMPLES.values())
    out = []
    for _ in range(pieces):
        roll = rng.random()
        if roll < 0.4:
            text = rng.choice(sample_texts)
            start = rng.randrange(len(text))
            out.append(text[start : start + rng.randrange(1, 40)])
        elif roll < 0.8:
            out.append(random_code_point(rng))
        else:
            out.append(random_code_point(rng) * rng.randrange(2, 6))
    return "".join(out)


RANDOM_TEXTS = [random_text(random.Random(seed), seed % 60) for seed in range(400)]


@pytest.fixture(scope="module")
def oracle():
    rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
    vocab = Path(rwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"
    return rwkv_tokenizer.TRIE_TOKENIZER(str(vocab))


def make_tokenizer(backend: str) -> Tokenizer:
    with pytest.MonkeyPatch.context() as patch:
        if backend == PURE:
            patch.setenv(PURE_ENV_VAR, "1")
        else:
            pytest.importorskip("pyrwkv_tokenizer")
            patch.delenv(PURE_ENV_VAR, raising=False)
        tokenizer = Tokenizer()
    assert tokenizer.backend == backend
    return tokenizer


@pytest.fixture(scope="module", params=[WHEEL, PURE])
def tok(request) -> Tokenizer:
    """The bundled-vocab tokenizer on each backend (conftest's `tokenizer` is the default one)."""
    return make_tokenizer(request.param)


@pytest.fixture(scope="module")
def pure_tokenizer() -> Tokenizer:
    return make_tokenizer(PURE)


def test_known_ids(tok):
    assert tok.encode("\n") == [11]
    assert tok.encode("\n\n") == [261]
    assert tok.encode("") == []
    assert tok.eos_id == 0
    assert tok.vocab_size == 65536


def test_bundled_vocab_has_the_oracle_tokens(pure_tokenizer, oracle):
    assert len(oracle.idx2token) == 65529
    for token_id in range(pure_tokenizer.vocab_size):
        assert pure_tokenizer.token_bytes(token_id) == oracle.idx2token.get(token_id, b"")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encode_matches_oracle_on_samples(tok, oracle, name):
    text = SAMPLES[name]
    assert tok.encode(text) == oracle.encode(text)
    assert tok.encode(text * 7) == oracle.encode(text * 7)


def test_encode_matches_oracle_on_random_texts(tok, oracle):
    mismatches = [text for text in RANDOM_TEXTS if tok.encode(text) != oracle.encode(text)]
    assert mismatches == []


def test_encode_matches_oracle_on_a_long_text(tok, oracle):
    text = "".join(RANDOM_TEXTS) + "".join(SAMPLES.values()) * 20
    assert len(text.encode()) > 50_000
    assert tok.encode(text) == oracle.encode(text)


def test_encode_matches_oracle_on_concatenated_vocab_tokens(tok, oracle):
    """Runs of real tokens put many near-miss longer matches at every boundary."""
    tokens = [t.decode("utf-8", errors="replace") for t in oracle.idx2token.values()]
    rng = random.Random(3)
    texts = ["".join(rng.choices(tokens, k=rng.randrange(1, 40))) for _ in range(300)]
    assert [tok.encode(text) for text in texts] == [oracle.encode(text) for text in texts]


def test_every_single_character_of_the_bmp_and_beyond(tok, oracle):
    text = "".join(chr(c) for c in range(0x20, 0x30000, 7) if not 0xD800 <= c <= 0xDFFF)
    assert tok.encode(text) == oracle.encode(text)


def test_lone_surrogate_is_rejected_like_the_oracle(tok, oracle):
    with pytest.raises(UnicodeEncodeError):
        oracle.encode("a\ud800b")
    with pytest.raises(UnicodeEncodeError) as raised:
        tok.encode("a\ud800b")
    assert isinstance(raised.value, RWKVChatError) and "position 1" in str(raised.value)


def test_encode_rejects_bytes(tok):
    with pytest.raises(TypeError):
        tok.encode(b"abc")


def test_decode_round_trip(tok, oracle):
    for text in [*SAMPLES.values(), *RANDOM_TEXTS[:100]]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text == oracle.decode(ids)
        assert tok.decode_bytes(ids) == text.encode("utf-8") == oracle.decodeBytes(ids)


def single_byte_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """byte value -> the id of the one-byte token (looked up, not assumed)."""
    by_bytes = {tokenizer.token_bytes(i): i for i in range(1, 300)}
    return {byte: by_bytes[bytes([byte])] for byte in range(256)}


def test_decode_of_partial_or_invalid_utf8_replaces(pure_tokenizer):
    byte_id = single_byte_ids(pure_tokenizer)
    for broken in [b"\xe4", b"\xe4\xb8", b"\x80", b"a\xffb", b"\xed\xa0\x80", b"\xf0\x9f\x98"]:
        ids = [byte_id[b] for b in broken]
        assert pure_tokenizer.decode_bytes(ids) == broken
        assert pure_tokenizer.decode(ids) == broken.decode("utf-8", errors="replace")


def test_end_of_text_and_unused_ids_decode_to_nothing(pure_tokenizer):
    assert pure_tokenizer.decode([0, 11, 65535, 0]) == "\n"
    assert pure_tokenizer.token_bytes(0) == b""
    for bad_id in (-1, 65536):
        with pytest.raises(ValueError):
            pure_tokenizer.decode([11, bad_id])
        with pytest.raises(ValueError):
            pure_tokenizer.token_bytes(bad_id)


def stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.feed(i) for i in ids], decoder.flush()


def test_stream_decoder_on_every_prefix(tok):
    text = "".join(SAMPLES[name] for name in ("chinese", "emoji_zwj", "combining", "arabic"))
    ids = tok.encode(text)
    for length in range(len(ids) + 1):
        pieces, rest = stream(tok, ids[:length])
        assert "".join(pieces) + rest == tok.decode(ids[:length])
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) == text and rest == ""
    assert not any("\ufffd" in piece for piece in pieces)


def utf8_proper_prefixes() -> set[bytes]:
    """Every incomplete start of a valid UTF-8 character (the last byte varies fastest)."""
    prefixes = set()
    for code_point in range(0x80, 0x110000, 0x40):
        if not 0xD800 <= code_point <= 0xDFFF:
            encoded = chr(code_point).encode("utf-8")
            prefixes.update(encoded[:n] for n in range(1, len(encoded)))
    return prefixes


def test_stream_decoder_byte_by_byte_holds_back_only_what_can_still_complete(pure_tokenizer):
    byte_id = single_byte_ids(pure_tokenizer)
    can_complete = utf8_proper_prefixes()
    rng = random.Random(7)
    valid = "".join(SAMPLES.values()).encode("utf-8")
    noisy = bytes(rng.choice([rng.randrange(256), rng.choice(valid)]) for _ in range(4000))
    for data in (valid, noisy, b"\x80\xed\xa0\xe0\x80\xf4\x90\xc0\xf5\xe4a\xf0\x9f\x98"):
        decoder = StreamDecoder(pure_tokenizer)
        emitted = ""
        for index, byte in enumerate(data):
            emitted += decoder.feed(byte_id[byte])
            assert decoder.pending == b"" or decoder.pending in can_complete
            assert emitted + decoder.pending.decode("utf-8", "replace") == data[: index + 1].decode(
                "utf-8", "replace"
            )
        assert emitted + decoder.flush() == data.decode("utf-8", errors="replace")
        assert decoder.pending == b""
        if data is valid:
            assert "\ufffd" not in emitted


def test_stream_decoder_emits_invalid_bytes_at_once(pure_tokenizer):
    byte_id = single_byte_ids(pure_tokenizer)
    decoder = StreamDecoder(pure_tokenizer)
    assert decoder.feed(byte_id[0x80]) == "\ufffd"  # lone continuation byte
    assert decoder.feed(byte_id[0xE4]) == ""  # start of a 3-byte character: wait
    assert decoder.feed(byte_id[0xB8]) == ""
    assert decoder.feed(byte_id[0xAD]) == "中"
    assert decoder.feed(byte_id[0xED]) == ""
    assert decoder.feed(byte_id[0xA0]) == "\ufffd\ufffd"  # would be a surrogate: never valid
    assert decoder.feed(byte_id[0xF0]) == ""
    assert decoder.feed(byte_id[ord("x")]) == "\ufffdx"
    assert decoder.feed(byte_id[0xE4]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.feed(0) == ""


def test_pure_env_var_selects_the_fallback(monkeypatch):
    monkeypatch.setenv(PURE_ENV_VAR, "1")
    assert Tokenizer().backend == PURE
    monkeypatch.setenv(PURE_ENV_VAR, "0")
    pytest.importorskip("pyrwkv_tokenizer")
    assert Tokenizer().backend == WHEEL


def test_missing_wheel_falls_back_to_python(monkeypatch):
    monkeypatch.delenv(PURE_ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "pyrwkv_tokenizer", None)  # makes the import fail
    tokenizer = Tokenizer()
    assert tokenizer.backend == PURE
    assert tokenizer.encode("\n\n") == [261]


def test_vocab_is_loaded_once_per_file():
    assert Tokenizer()._vocab is Tokenizer()._vocab


def write_vocab(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_custom_vocab_uses_the_python_matcher(tmp_path):
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    lines += ["257 'ab' 2", "258 'abc' 3", "259 'b\u00e9' 3"]
    tokenizer = Tokenizer(write_vocab(tmp_path, "\r\n".join(lines) + "\r\n"))
    assert tokenizer.backend == PURE
    assert tokenizer.vocab_size == 320
    assert tokenizer.encode("abcabbé") == [258, 257, 259]
    assert tokenizer.decode([258, 259]) == "abcbé"


@pytest.mark.parametrize(
    "line, complaint",
    [
        ("2 'ab' 3", "3"),
        ("2 __import__('os').getcwd() 3", "malformed"),
        ("2 [1, 2] 2", "str or bytes"),
        ("x 'a' 1", "malformed"),
        ("2 'ab'", "malformed"),
        ("0 'ab' 2", "end-of-text"),
        ("1 'ab' 2", "duplicate"),
        ("2 b'a' 1", "same bytes"),
        ("2 '\\ud800' 3", "surrogate"),
    ],
)
def test_malformed_vocab_line_names_file_and_line(tmp_path, line, complaint):
    path = write_vocab(tmp_path, f"1 'a' 1\n{line}\n")
    with pytest.raises(ValueError, match=complaint) as caught:
        Tokenizer(path)
    assert f"{path}:2:" in str(caught.value)
