"""Run ChatRWKV-style scripts (tests/compat/scripts) under the oracle `rwkv` 0.8.32 or under
rwkv_chat.compat, in a fresh subprocess each, and return what each script left in RESULTS.

For rwkv_chat.compat only the two import lines change:
    from rwkv.model import RWKV        ->  from rwkv_chat.compat.model import RWKV
    from rwkv.utils import ...         ->  from rwkv_chat.compat.utils import ...
The oracle needs RWKV_V7_ON=1 (read at its import) for v7 files, so its rwkv.model is
re-imported per version; rwkv_chat ignores the variable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
IMPORTS = {
    "from rwkv.model import RWKV\n": "from rwkv_chat.compat.model import RWKV\n",
    "from rwkv.utils import ": "from rwkv_chat.compat.utils import ",
}
ROOT = Path(__file__).resolve().parents[2]


def script_source(name: str, implementation: str) -> str:
    source = (SCRIPTS / name).read_text()
    if implementation == "compat":
        for old, new in IMPORTS.items():
            assert old in source, f"{name} lacks the import line {old!r}"
            source = source.replace(old, new)
    return source


def run_scripts(implementation: str, names: list[str], models: dict[str, dict[str, str]]) -> dict[str, dict]:
    """{version: {script name: its RESULTS}}: every script run once per version, all in one
    subprocess. `models` maps a version ("7", "4", ...) to the env vars naming its checkpoints
    (COMPAT_MODEL, COMPAT_MODEL_B)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RWKV_V7_ON", "RWKV_DE_VERSION", "RWKV_DML_ON")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, __file__, implementation, json.dumps(models), *names]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    if process.returncode != 0:
        raise RuntimeError(f"{implementation} scripts failed:\n{(process.stdout + process.stderr)[-5000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def _child(implementation: str, models: dict[str, dict[str, str]], names: list[str]) -> None:
    import contextlib
    import io

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the oracle's v6/v7 CPU path crawls on denormals without it
    results = {}
    for version, files in models.items():
        os.environ.update(files)
        os.environ["RWKV_V7_ON"] = "1" if version == "7" else "0"
        if implementation == "oracle":
            _import_oracle()
        results[version] = {}
        for name in names:
            namespace = {"__name__": "__main__", "__file__": str(SCRIPTS / name)}
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(script_source(name, implementation), name, "exec"), namespace)
            results[version][name] = namespace["RESULTS"]
    print(json.dumps(results))


def _import_oracle() -> None:
    """(Re)import the oracle's rwkv.model, which picks its v7 or v4-v6 class from RWKV_V7_ON at
    import. Plus time savers that change no result: its loader calls gc.collect() per layer, and
    every PIPELINE rebuilds its tokenizer trie (about a second each); build that once."""
    import functools
    import importlib
    import types

    import rwkv

    if "rwkv.model" in sys.modules:
        importlib.reload(sys.modules["rwkv.model"])
    import rwkv.model

    rwkv.model.gc = types.SimpleNamespace(collect=lambda *args: 0)
    if os.path.dirname(rwkv.__file__) not in sys.path:
        sys.path.insert(0, os.path.dirname(rwkv.__file__))  # where PIPELINE imports it from
    import rwkv_tokenizer

    if not hasattr(rwkv_tokenizer.TRIE_TOKENIZER, "cache_info"):
        rwkv_tokenizer.TRIE_TOKENIZER = functools.lru_cache(maxsize=None)(rwkv_tokenizer.TRIE_TOKENIZER)


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:])
