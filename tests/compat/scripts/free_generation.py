# ChatRWKV-style script: logits from forward, then free generation through PIPELINE.generate
# with a callback, at several sampling settings. Runs unchanged on `rwkv` 0.8.32 and, with the
# two import lines changed, on rwkv_chat.compat. Results go to RESULTS (read by the test).
import os

import numpy as np

os.environ["RWKV_JIT_ON"] = "1"  # set before importing RWKV
os.environ["RWKV_CUDA_ON"] = "0"

from rwkv.model import RWKV
from rwkv.utils import PIPELINE, PIPELINE_ARGS

RESULTS = []
model = RWKV(model=os.environ["COMPAT_MODEL"], strategy="cpu fp32")
pipeline = PIPELINE(model, "rwkv_vocab_v20230424")

# one call over five tokens, or the same tokens in three calls: the same logits
out, state = model.forward([187, 510, 1563, 310, 247], None)
whole = out.detach().cpu().numpy().copy()
out, state = model.forward([187, 510], None)
out, state = model.forward([1563], state)
out, state = model.forward([310, 247], state)
RESULTS.append(["split forward matches", bool(np.allclose(whole, out.detach().cpu().numpy(), atol=1e-5))])

pieces = []


def keep_piece(s):
    pieces.append(s)


ctx = pipeline.refine_context("\n  The dragons of the valley   \n\n spoke perfect Chinese.\u3000\n")
RESULTS.append(["refined", ctx])
settings = [
    dict(temperature=1.0, top_p=0.7, top_k=0, alpha_frequency=0.25, alpha_presence=0.25, token_ban=[0]),
    dict(temperature=1.5, top_p=0.3, top_k=0, alpha_frequency=0.2, alpha_presence=0.2),
    dict(temperature=0.7, top_p=0.9, top_k=20, alpha_decay=0.99, token_stop=[11]),
    dict(temperature=0, top_p=0.5, top_k=0),
    dict(temperature=1.0, top_p=0.95, top_k=5, chunk_len=3),
]
for number, options in enumerate(settings):
    np.random.seed(100 + number)
    pieces.clear()
    args = PIPELINE_ARGS(**options)
    text = pipeline.generate(ctx, token_count=24, args=args, callback=keep_piece)
    RESULTS.append([options, text, list(pieces), pipeline.encode(text)])
