# ChatRWKV-style script: classifier-free guidance, mixing the logits of two models (one sees a
# context, the other does not) before sampling.
import os

import numpy as np

os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"

from rwkv.model import RWKV
from rwkv.utils import PIPELINE

RESULTS = []
model = RWKV(model=os.environ["COMPAT_MODEL"], strategy="cpu fp32")
other = RWKV(model=os.environ["COMPAT_MODEL_B"], strategy="cpu fp32")
pipeline = PIPELINE(model, "rwkv_vocab_v20230424")


def cfg_generator(with_ctx, without_ctx, cfg_factor, limit=20):
    out_tokens, occurrence = [], {}
    with_state = without_state = None
    for i in range(limit):
        if i == 0:
            with_out, with_state = model.forward(pipeline.encode(with_ctx), with_state)
            without_out, without_state = other.forward(pipeline.encode(without_ctx), without_state)
        else:
            with_out, with_state = model.forward([token], with_state)
            without_out, without_state = other.forward([token], without_state)
        out = with_out * cfg_factor + without_out * (1 - cfg_factor)
        for n in occurrence:
            out[n] -= 0.4 + occurrence[n] * 0.4
        token = pipeline.sample_logits(out, temperature=1.0, top_p=0.2)
        if token == 0:
            break
        out_tokens += [token]
        for n in occurrence:
            occurrence[n] *= 0.996
        occurrence[token] = 1 + (occurrence[token] if token in occurrence else 0)
    return out_tokens, pipeline.decode(out_tokens)


question = "User: what is RWKV?\n\nAssistant:"
context = "User: RWKV is a recurrent network without attention.\nwhat is RWKV?\n\nAssistant:"
for factor in (0, 1, 1.5):
    np.random.seed(int(factor * 10))
    RESULTS.append([factor, *cfg_generator(context, question, factor)])
