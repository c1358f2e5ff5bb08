"""The reference implementation (`rwkv==0.8.32`, ChatRWKV's pip package), opened the same way by
every caller that runs it: the test oracle (tests/oracle.py), `rwkv-chat bench
--compare-reference` (rwkv_chat/benchmark.py) and scripts/gpu_check.py.

The reference reads its environment once, at import (`RWKV_V7_ON` even swaps the `RWKV` class
for the v7 one), so it always runs in a child process of its own: `reference_env` is that
process's environment, and in the child `load_reference_module` imports a fresh copy of its
model.py for v7 or for v4-v6, and `open_reference_model` opens a checkpoint with it.
Never imported by the runtime's own code paths; the reference is an oracle, not a dependency.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
import zipfile

REFERENCE_PACKAGE = "rwkv"
REFERENCE_VERSION = "0.8.32"
V7_KEY = "blocks.0.att.r_k"  # only RWKV-7 checkpoints have it
_CLEARED = ("RWKV_V7_ON", "RWKV_DE_VERSION", "RWKV_DML_ON")


def reference_available() -> bool:
    return importlib.util.find_spec(REFERENCE_PACKAGE) is not None


def reference_env(*, v7: bool | None = None, cuda_on: bool = False, jit: bool = True,
                  drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of a reference child process: this one's, without the switches that
    would change the reference under the caller's feet, with RWKV_CUDA_ON / RWKV_JIT_ON as asked
    and RWKV_V7_ON when `v7` is given (None: `load_reference_module` sets it per copy)."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED and k not in drop}
    env.update(RWKV_CUDA_ON="1" if cuda_on else "0", RWKV_JIT_ON="1" if jit else "0")
    if v7 is not None:
        env["RWKV_V7_ON"] = "1" if v7 else "0"
    return env


def is_v7_checkpoint(path: str) -> bool:
    """Whether the checkpoint at `path` is RWKV-7, read from the pickle inside a torch.save zip
    file (unpickling a whole dict costs more than the reference's own load of a tiny model)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle_name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            return V7_KEY.encode() in archive.read(pickle_name)
    except (zipfile.BadZipFile, StopIteration):  # legacy (non-zip) format
        import torch

        return V7_KEY in torch.load(path, map_location="cpu", weights_only=True, mmap=False)


def load_reference_module(v7: bool, *, skip_gc: bool = True):
    """A fresh copy of the reference's model.py, imported with RWKV_V7_ON set for v7 or not, so
    one process can hold both. skip_gc: its loader calls gc.collect() once per layer and more
    (85% of a tiny model's load time); skipping them changes no number, only load time, so a
    benchmark of load time keeps them."""
    import rwkv

    os.environ["RWKV_V7_ON"] = "1" if v7 else "0"
    source = os.path.join(os.path.dirname(rwkv.__file__), "model.py")
    name = "rwkv_reference_v7" if v7 else "rwkv_reference_v4_v6"
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.jit needs to find the module of the scripted code
    spec.loader.exec_module(module)
    if skip_gc:
        module.gc = types.SimpleNamespace(collect=lambda *args: 0)
    return module


def open_reference_model(module, path: str, strategy: str, v7: bool, *, verbose: bool = False):
    """module.RWKV for the checkpoint at `path` (which must end in ".pth"): the v7 class appends
    ".pth" to whatever name it is given, the v4-v6 class takes the file itself."""
    if not path.endswith(".pth"):
        raise ValueError(f"{path}: the reference needs a file name ending in .pth")
    if v7:
        return module.RWKV(path[: -len(".pth")], strategy)
    return module.RWKV(path, strategy, verbose=verbose)
