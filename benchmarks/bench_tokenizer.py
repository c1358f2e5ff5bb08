"""Encode ~1 MB of generated multilingual text with the reference tokenizer and with ours.

    python benchmarks/bench_tokenizer.py [--megabytes 1.0] [--repeats 3]

Prints the best-of-N seconds for each and the speed ratio against the reference
(`rwkv.rwkv_tokenizer.TRIE_TOKENIZER` from rwkv==0.8.32), for both of our backends.
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_chat.tokenizer import PURE_ENV_VAR, Tokenizer  # noqa: E402

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45 PM and the café is still open.\n",
    "机器学习是人工智能的一个分支。我们今天去北京大学吧，好吗？天气很好。\n",
    "日本語のテキストです。カタカナとひらがな、そして漢字を混ぜます。\n",
    "مرحبا بالعالم، هذه جملة باللغة العربية للاختبار.\n",
    "Привет, мир! Это тест токенизатора на русском языке.\n",
    "한국어 텍스트도 있습니다. Ελληνικά κείμενα. हिन्दी पाठ। ภาษาไทย\n",
    "Emoji 👨‍👩‍👧‍👦 👍🏽 🏳️‍🌈 ❤️ 🇯🇵, combining e\u0301 a\u0308.\r\n",
    "def f(x):\n\treturn {'k': [x ** 2 for _ in range(10)]}  # code\n\n",
]


def multilingual_text(megabytes: float, seed: int = 0) -> str:
    """Shuffled paragraphs with words dropped at random and a few random code points."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < megabytes * 1_000_000:
        words = rng.choice(PARAGRAPHS).split(" ")
        part = " ".join(w for w in words if rng.random() > 0.2)
        if rng.random() < 0.3:
            code_point = rng.randrange(0x20, 0x30000)
            part += chr(code_point) if not 0xD800 <= code_point <= 0xDFFF else "?"
        parts.append(part)
        size += len(part.encode("utf-8"))
    return "".join(parts)


def best_time(encode, text: str, repeats: int) -> tuple[float, list[int]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = encode(text)
        times.append(time.perf_counter() - start)
    return min(times), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    text = multilingual_text(args.megabytes)
    print(f"text: {len(text.encode('utf-8')) / 1e6:.2f} MB UTF-8, {len(text)} characters")

    oracle_vocab = Path(sys.modules["rwkv"].__file__).parent / "rwkv_vocab_v20230424.txt"
    oracle = TRIE_TOKENIZER(str(oracle_vocab))
    oracle_seconds, expected = best_time(oracle.encode, text, args.repeats)
    print(f"{'reference TRIE_TOKENIZER':28s} {oracle_seconds:8.4f} s  {len(expected)} tokens")

    for force_pure in (False, True):
        if force_pure:
            os.environ[PURE_ENV_VAR] = "1"
        else:
            os.environ.pop(PURE_ENV_VAR, None)
        tokenizer = Tokenizer()
        start = time.perf_counter()
        tokenizer.encode("warm up: builds the backend's tables")
        setup_seconds = time.perf_counter() - start
        seconds, ids = best_time(tokenizer.encode, text, args.repeats)
        verdict = "same ids" if ids == expected else "IDS DIFFER FROM THE REFERENCE"
        print(
            f"{'rwkv_chat ' + tokenizer.backend:28s} {seconds:8.4f} s  "
            f"{oracle_seconds / seconds:5.1f}x the reference  ({verdict}; first-use setup "
            f"{setup_seconds:.2f} s)"
        )

    start = time.perf_counter()
    decoded = tokenizer.decode(expected)
    seconds = time.perf_counter() - start
    print(f"{'rwkv_chat decode':28s} {seconds:8.4f} s  round trip ok: {decoded == text}")


if __name__ == "__main__":
    main()
