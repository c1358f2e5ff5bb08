"""rwkv-chat: chat with local RWKV language models; an importable RWKV runtime underneath.

    from rwkv_chat import RWKV, Pipeline, Tokenizer
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "RWKV": ("rwkv_chat.engine.model", "RWKV"),
    "RWKVState": ("rwkv_chat.engine.state", "RWKVState"),
    "ModelShape": ("rwkv_chat.engine.state", "ModelShape"),
    "Tokenizer": ("rwkv_chat.tokenizer", "Tokenizer"),
    "Pipeline": ("rwkv_chat.pipeline", "Pipeline"),
    "Pipline": ("rwkv_chat.pipeline", "Pipline"),
    "GenerationResult": ("rwkv_chat.pipeline", "GenerationResult"),
    "SamplingSettings": ("rwkv_chat.sampling", "SamplingSettings"),
    "ChatSession": ("rwkv_chat.chat.session", "ChatSession"),
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rwkv_chat' has no attribute {name!r}")
