"""The API of ChatRWKV's `rwkv` pip package (0.8.32) on top of rwkv-chat's engine.

Scripts written for that package run after changing their import lines only:

    from rwkv_chat.compat.model import RWKV             # was: from rwkv.model import RWKV
    from rwkv_chat.compat.utils import PIPELINE, PIPELINE_ARGS   # was: from rwkv.utils import ...

`RWKV(model=..., strategy=...)`, `model.forward(tokens, state)` with the flat state list,
`model.args`, `model.strategy[i]`, `PIPELINE.encode/decode/refine_context/sample_logits/generate`
behave as there; `sample_logits` and `generate` draw the same tokens for the same
`np.random.seed`. What differs: see `model.RWKV` and the README ("Coming from ChatRWKV").
"""
