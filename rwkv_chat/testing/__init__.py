"""Helpers for tests and benchmarks: random-weight checkpoints in the official RWKV layout.

The names below are loaded lazily from `rwkv_chat.testing.checkpoints`, so that
`python -m rwkv_chat.testing.checkpoints` runs without importing the module twice.
"""
__all__ = [
    "VERSIONS",
    "default_ffn_dim",
    "default_lora_dims",
    "make_checkpoint",
    "make_state_file",
    "merge_state",
    "save_checkpoint",
]


def __getattr__(name: str):
    if name in __all__:
        from . import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
