# ChatRWKV-style script: a hand-written chat loop that edits the logits `out` in place
# (repetition penalty, banned end-of-text) and draws with pipeline.sample_logits; states are
# saved and restored with copy.deepcopy and one is built by hand from model.args / model.strategy.
import copy
import os

import numpy as np
import torch

os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"

from rwkv.model import RWKV
from rwkv.utils import PIPELINE

RESULTS = []
model = RWKV(model=os.environ["COMPAT_MODEL"], strategy="cpu fp32")
pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
CHUNK_LEN = 4
model_state = None


def run_rnn(text):
    global model_state
    tokens = [int(x) for x in pipeline.encode(text)]
    while len(tokens) > 0:
        out, model_state = model.forward(tokens[:CHUNK_LEN], model_state)
        tokens = tokens[CHUNK_LEN:]
    return out


def reply(out, temperature, top_p, top_k=0, limit=30):
    global model_state
    occurrence, out_tokens, out_last, shown = {}, [], 0, ""
    for i in range(limit):
        for n in occurrence:
            out[n] -= 0.4 + occurrence[n] * 0.4  # repetition penalty, in place
        out[0] -= 1e10  # no end-of-text
        token = pipeline.sample_logits(out, temperature=temperature, top_p=top_p, top_k=top_k)
        out, model_state = model.forward([token], model_state)
        out_tokens += [token]
        for n in occurrence:
            occurrence[n] *= 0.996
        occurrence[token] = 1 + (occurrence[token] if token in occurrence else 0)
        tmp = pipeline.decode(out_tokens[out_last:])
        if "\ufffd" not in tmp and not tmp.endswith("\n"):
            shown += tmp
            out_last = i + 1
        if "\n\n" in tmp:
            shown += tmp
            break
    return out_tokens, shown


np.random.seed(7)
out = run_rnn("User: hi\n\nAssistant: Hi. I am your assistant.\n\n")
saved_out, saved_state = out.clone(), copy.deepcopy(model_state)
for temperature, top_p, top_k in ((1.0, 0.3, 0), (0.8, 0.6, 10), (1.3, 0.95, 0)):
    model_state = copy.deepcopy(saved_state)  # every question starts from the saved prompt
    out = run_rnn("User: Why is there something instead of nothing?\n\nAssistant:")
    RESULTS.append(reply(out, temperature, top_p, top_k))
model_state = copy.deepcopy(saved_state)
RESULTS.append(reply(saved_out.clone(), 1.0, 0.5))  # regenerate from the saved logits

# a state built by hand, as scripts that load tuned states do
args = model.args
per_layer = len(saved_state) // args.n_layer
state = []
for i in range(args.n_layer):
    if hasattr(model, "strategy"):  # the per-slot plan (0.8.32's v7 class has none)
        atype, device = model.strategy[i].atype, model.strategy[i].device
    else:
        atype, device = torch.float, "cpu"
    layer = [torch.zeros(args.n_embd, dtype=atype, device=device) for _ in range(per_layer)]
    if per_layer == 3:  # v5.2-v7: the middle entry is the [heads, size, size] matrix state
        layer[1] = torch.zeros(args.n_embd // 64, 64, 64, dtype=torch.float, device=device)
    else:  # v4: pp starts very negative
        layer[3] -= 1e30
        layer[1:4] = [t.float() for t in layer[1:4]]
    state += layer
model_state = state
np.random.seed(8)
RESULTS.append(reply(run_rnn("User: hello\n\nAssistant:"), 1.0, 0.4))
