"""The RWKV "world" tokenizer: greedy longest match over UTF-8 bytes.

Encoding uses the `pyrwkv-tokenizer` wheel when it is importable and the vocab is the bundled one,
otherwise a pure-Python matcher; RWKV_CHAT_PURE_TOKENIZER=1 forces the latter. Both give the same
ids as the reference `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`. Decoding is always done here: the
wheel's decode panics on partial UTF-8.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path
from typing import Iterable

from .errors import TextEncodingError, TokenError

__all__ = ["Tokenizer", "StreamDecoder", "WORLD_VOCAB_PATH"]

WORLD_VOCAB_PATH = Path(__file__).parent / "data" / "rwkv_vocab_v20230424.txt"
PURE_ENV_VAR = "RWKV_CHAT_PURE_TOKENIZER"
MAX_TOKEN_ID = 1 << 20


class _Vocab:
    """A parsed vocab file: the bytes of each id, plus encoders built on first use."""

    def __init__(self, path: Path):
        self.path = path
        bytes_by_id = _parse_vocab_file(path)
        # Model heads pad the vocab to a multiple of 64 (65530 -> 65536 for the world vocab).
        self.vocab_size = -(-(max(bytes_by_id, default=0) + 1) // 64) * 64
        self.token_bytes = [b""] * self.vocab_size
        for token_id, token in bytes_by_id.items():
            self.token_bytes[token_id] = token

    @functools.cached_property
    def prefix_ids(self) -> dict[bytes, int]:
        """Every token and every prefix of one -> its id, or 0 for a prefix that is no token."""
        prefix_ids: dict[bytes, int] = {}
        for token_id, token in enumerate(self.token_bytes):
            for length in range(1, len(token)):
                prefix_ids.setdefault(token[:length], 0)
            if token:
                prefix_ids[token] = token_id
        return prefix_ids

    @functools.cached_property
    def wheel(self):
        import pyrwkv_tokenizer

        return pyrwkv_tokenizer.WorldTokenizer(str(self.path))


def _parse_vocab_file(path: Path) -> dict[int, bytes]:
    """Lines look like `id <python str or bytes literal> <byte length>`."""
    bytes_by_id: dict[int, bytes] = {}
    ids_by_bytes: dict[bytes, int] = {}
    with open(path, "rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            try:
                line = raw_line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                line = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
                raise _malformed_line_error(path, line_number, line, "not UTF-8") from None
            if not line.strip():
                continue
            bad = functools.partial(_malformed_line_error, path, line_number, line)
            first_space, last_space = line.find(" "), line.rfind(" ")
            if first_space <= 0 or last_space <= first_space:
                raise bad("expected 'id literal length'")
            try:
                token_id = int(line[:first_space])
                length = int(line[last_space + 1 :])
                token = ast.literal_eval(line[first_space + 1 : last_space])
                if isinstance(token, str):
                    token = token.encode("utf-8")  # may fail on a lone surrogate
            except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
                raise bad(str(error) or type(error).__name__) from None
            if not isinstance(token, bytes):
                raise bad("token is not a str or bytes literal")
            if len(token) != length:
                raise bad(f"token is {len(token)} bytes, line says {length}")
            if not token:
                raise bad("empty token")
            if not 1 <= token_id < MAX_TOKEN_ID:
                raise bad(f"ids run from 1 (0 is end-of-text) to {MAX_TOKEN_ID - 1}")
            if token_id in bytes_by_id:
                raise bad(f"duplicate id {token_id}")
            if token in ids_by_bytes:
                raise bad(f"same bytes as id {ids_by_bytes[token]}")
            bytes_by_id[token_id] = token
            ids_by_bytes[token] = token_id
    if not bytes_by_id:
        raise ValueError(f"{path}: vocab file has no tokens")
    return bytes_by_id


def _malformed_line_error(path: Path, line_number: int, line: str, why: str) -> ValueError:
    return ValueError(f"{path}:{line_number}: malformed vocab line ({why}): {line[:80]!r}")


@functools.lru_cache(maxsize=None)
def _load_vocab(resolved_path: str) -> _Vocab:
    return _Vocab(Path(resolved_path))


def _wheel_available() -> bool:
    try:
        import pyrwkv_tokenizer  # noqa: F401
    except ImportError:
        return False
    return True


def _encode_greedy(data: bytes, prefix_ids: dict[bytes, int]) -> list[int]:
    """At each position take the longest token; stop growing once no token has that prefix."""
    ids: list[int] = []
    append, lookup = ids.append, prefix_ids.get
    start, end = 0, len(data)
    while start < end:
        best_id, best_stop = 0, start
        stop = start + 1
        while stop <= end:
            token_id = lookup(data[start:stop])
            if token_id is None:
                break
            if token_id:
                best_id, best_stop = token_id, stop
            stop += 1
        if not best_id:
            raise ValueError(f"no token in the vocab starts with byte 0x{data[start]:02x}")
        append(best_id)
        start = best_stop
    return ids


class Tokenizer:
    """World tokenizer. `Tokenizer()` uses the bundled vocab; loading is cached per file."""

    eos_id = 0

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        path = Path(vocab_path) if vocab_path is not None else WORLD_VOCAB_PATH
        self._vocab = _load_vocab(str(path.resolve()))
        self.vocab_path = self._vocab.path
        self.vocab_size: int = self._vocab.vocab_size
        self._token_bytes = self._vocab.token_bytes
        use_wheel = (
            os.environ.get(PURE_ENV_VAR, "") in ("", "0")
            and self.vocab_path == WORLD_VOCAB_PATH.resolve()
            and _wheel_available()
        )
        self.backend = "pyrwkv-tokenizer" if use_wheel else "python"

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.vocab_path)!r}, backend={self.backend!r})"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate, e.g. from os.fsdecode of bad bytes
            raise TextEncodingError(error) from None
        if self.backend == "pyrwkv-tokenizer":
            return self._vocab.wheel.encode(text)
        return _encode_greedy(data, self._vocab.prefix_ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id; b"" for end-of-text (0) and unused ids below vocab_size."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenError(f"token id {token_id} is outside 0..{self.vocab_size - 1}")
        return self._token_bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenError(f"token id {bad} is outside 0..{self.vocab_size - 1}")
        return b"".join(map(self._token_bytes.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; invalid or partial UTF-8 becomes U+FFFD (never raises for it)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _utf8_tail_to_hold(data: bytes) -> int:
    """How many trailing bytes are the start of a UTF-8 character that may still complete."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if 0x80 <= byte <= 0xBF:  # continuation byte: the lead may be further back
            continue
        if 0xC2 <= byte <= 0xDF:
            length = 2
        elif 0xE0 <= byte <= 0xEF:
            length = 3
        elif 0xF0 <= byte <= 0xF4:
            length = 4
        else:  # ASCII or a byte that never starts a character
            return 0
        if back >= length:  # the character is complete (or already invalid)
            return 0
        if back == 1:
            return 1
        # The second byte's allowed range depends on the lead; later bytes are any continuation.
        try:
            (data[-back:] + b"\x80" * (length - back)).decode("utf-8")
        except UnicodeDecodeError:
            return 0
        return back
    return 0


class StreamDecoder:
    """Turns ids fed one at a time into text, holding back a character that is still arriving.

    Bytes that can never become valid UTF-8 come out as U+FFFD as soon as that is certain. The
    concatenation of every `feed()` plus `flush()` equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self._pending = b""

    @property
    def pending(self) -> bytes:
        """Bytes held back: the incomplete start of a UTF-8 character (at most 3 bytes)."""
        return self._pending

    def feed(self, token_id: int) -> str:
        data = self._pending + self.tokenizer.token_bytes(token_id)
        ready = len(data) - _utf8_tail_to_hold(data)
        self._pending = data[ready:]
        return data[:ready].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """The held-back bytes (as U+FFFD: they never completed); the decoder starts afresh."""
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")
