"""The embedded demo model: a tiny RWKV-7 chat model shipped inside the package.

The package ships a *compact* file (``rwkv_chat/data/demo/rwkv7-demo.safetensors``, bf16): the
official RWKV-7 tensors, except that ``emb.weight`` and ``head.weight`` hold only the rows of
the tokens the model was trained on, plus ``vocab.token_ids`` (their world-tokenizer ids).
:func:`demo_model_path` expands it once into an ordinary official-layout ``.pth`` with all
65,536 rows (see :func:`expand_to_world`) in the user cache folder and returns that path, which
any RWKV-7 loader opens (the oracle included). The trainer (`rwkv_chat.training`, which the
runtime never imports) writes the compact file with :func:`save_compact`.

Importing this module is cheap (torch is imported on use).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .files import write_atomically

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMPACT_NAME",
    "DEMO_DIR",
    "DEMO_MODEL_NOTE",
    "trained_token_count",
    "compact_path",
    "expand_to_world",
    "demo_model_path",
    "load_compact",
    "save_compact",
]

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
COMPACT_NAME = "rwkv7-demo.safetensors"
FORMAT = "rwkv-chat-demo-compact/1"
WORLD_VOCAB = 65536
UNSEEN_LOGIT = -50.0  # logit given to tokens outside the local vocabulary by expand_to_world
EXPANDED_PREFIX = "rwkv7-demo-"  # the expanded demo model's file name: rwkv7-demo-<digest>.pth
LABEL = "demo model"

DEMO_MODEL_NOTE = (
    "Trained from scratch on one CPU thread in 22 minutes (3000 steps of 4 x 256 tokens, about one pass over "
    "3M tokens) on everyday chit-chat: the Chit-Chat Challenge dataset (BYU PCC lab, MIT licence, "
    "PyPI chitchat-dataset) and the English ChatterBot corpus (Gunther Cox, BSD licence, PyPI "
    "chatterbot-corpus). Final loss: train 3.57, validation 3.73 nats/token (unigram baseline "
    "6.27). It answers in short casual sentences and knows nothing; open a real RWKV model with "
    "--model for actual answers. Rebuild: python scripts/train_demo_model.py"
)
"""The part of the demo model's description that is not read from the model itself."""


def trained_token_count(path: str | os.PathLike | None = None) -> int:
    """How many tokens of the world vocabulary the demo model was trained on (the compact
    file's rows), read from the file's header."""
    from safetensors import safe_open

    with safe_open(str(Path(path) if path is not None else compact_path()), framework="pt") as f:
        return f.get_slice("vocab.token_ids").get_shape()[0]


def compact_path() -> Path:
    return DEMO_DIR / COMPACT_NAME


def save_compact(path: str | os.PathLike, state_dict: dict, token_ids, meta: dict) -> None:
    """Write the compact demo file: tensors of ``state_dict`` (local vocabulary), the world ids
    of its rows as ``vocab.token_ids``, and ``meta`` as JSON in the safetensors metadata."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    tensors["vocab.token_ids"] = torch.as_tensor(token_ids, dtype=torch.int64).contiguous()
    def write(temp: Path) -> None:
        save_file(tensors, str(temp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
        os.chmod(temp, 0o644)  # mkstemp makes owner-only files; this one ships in the package

    write_atomically(path, write)


def load_compact(path: str | os.PathLike | None = None) -> tuple[dict, torch.Tensor, dict]:
    """(state dict over the local vocabulary, world ids of its rows, metadata)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else compact_path()
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a compact demo model ({header.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    token_ids = tensors.pop("vocab.token_ids")
    return tensors, token_ids, json.loads(header.get("meta", "{}"))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def demo_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the demo model as an official RWKV-7 ``.pth`` (65,536-row vocabulary, bf16).

    Expanded from the shipped compact file into ``cache_dir`` (default: the user cache folder,
    ``platformdirs.user_cache_dir("rwkv-chat")``/demo) on first use. The file name carries the
    SHA-256 of the compact file, so a changed demo model is expanded anew and an up-to-date
    expansion is reused; it is written to a temporary file and renamed into place (atomic), so
    a crash or a concurrent caller never sees half a file. Older expansions are removed.
    """
    source = compact_path()
    if not source.is_file():
        raise FileNotFoundError(f"the demo model is missing from the package: {source}")
    if cache_dir is None:
        import platformdirs

        cache_dir = Path(platformdirs.user_cache_dir("rwkv-chat")) / "demo"
    cache_dir = Path(cache_dir)
    digest = _file_digest(source)[:16]
    target = cache_dir / f"{EXPANDED_PREFIX}{digest}.pth"
    if target.is_file():
        return target

    import torch

    tensors, token_ids, _meta = load_compact(source)
    full = expand_to_world(tensors, token_ids, WORLD_VOCAB)
    write_atomically(target, lambda temp: torch.save(full, temp))
    for old in cache_dir.glob(f"{EXPANDED_PREFIX}*.pth"):
        if old != target:
            try:
                old.unlink()
            except OSError:
                pass
    return target


def expand_to_world(
    sd: dict[str, torch.Tensor],
    token_ids: torch.Tensor,
    world_vocab: int = 65536,
    unseen_logit: float = UNSEEN_LOGIT,
) -> dict[str, torch.Tensor]:
    """Turn a local-vocabulary state dict into one with ``world_vocab`` rows.

    ``token_ids[i]`` is the world id of local row ``i``. Unseen tokens get the mean embedding
    (a harmless "average token" if a user types one) and a head row that only reads the bias
    channel, so their logit is ``unseen_logit`` whatever the hidden state. Requires a model
    trained with ``bias_channel=True`` (checked: ln_out's last channel must be the constant 1).
    """
    import torch

    token_ids = torch.as_tensor(token_ids, dtype=torch.long)
    emb, head = sd["emb.weight"].detach(), sd["head.weight"].detach()
    if emb.shape[0] != token_ids.numel() or head.shape[0] != token_ids.numel():
        raise ValueError("token_ids does not match the local vocabulary size")
    lw, lb = sd["ln_out.weight"].float(), sd["ln_out.bias"].float()
    if lw[-1].item() != 0.0 or lb[-1].item() != 1.0:
        raise ValueError("state dict has no bias channel (ln_out last channel must be 0*x+1)")
    C = emb.shape[1]
    new_emb = emb.float().mean(0, keepdim=True).repeat(world_vocab, 1)
    new_emb[token_ids] = emb.float()
    new_head = torch.zeros(world_vocab, C)
    new_head[:, -1] = unseen_logit
    new_head[token_ids] = head.float()
    out = dict(sd)
    out["emb.weight"] = new_emb.to(emb.dtype)
    out["head.weight"] = new_head.to(head.dtype)
    return out


def model_label(name: str) -> str:
    """A model's name as the user sees it: "demo model" for the expanded demo file."""
    return LABEL if name.startswith(EXPANDED_PREFIX) else name
