"""Helpers for tests and benchmarks: random-weight checkpoints in the official RWKV layout."""
from .checkpoints import (
    VERSIONS,
    default_ffn_dim,
    default_lora_dims,
    make_checkpoint,
    make_state_file,
    merge_state,
    save_checkpoint,
)

__all__ = [
    "VERSIONS",
    "default_ffn_dim",
    "default_lora_dims",
    "make_checkpoint",
    "make_state_file",
    "merge_state",
    "save_checkpoint",
]
