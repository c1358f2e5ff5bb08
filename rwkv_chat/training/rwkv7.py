"""A small, readable RWKV-7 ("Goose") language model for training on a CPU.

This module is for *training* the embedded demo model (and for tests). Inference lives in
``rwkv_chat.engine``; the two only meet through the checkpoint format: :meth:`RWKV7.export`
returns a state dict in the official RWKV-7 key layout, which any RWKV-7 runtime loads.

The model runs a whole ``[B, T]`` batch at once. Everything except the WKV recurrence is a
plain batched tensor op; the recurrence is the engine's own (``engine/ops/torch_ref.wkv7``,
chunked matrix products over the ``[B, H, N, N]`` state; autograd records it).

Per layer, with ``x`` the layer-normed input and ``x'`` the previous token's (zeros at t=0):

* token shift: ``x_c = x + (x' - x) * mu_c`` for c in r, w, k, v, a, g
* ``r, k, v`` = linear projections; decay ``w = exp(-e^{-1/2} * sigmoid(w0 + tanh(x_w W1) W2))``
* in-context learning rate ``a = sigmoid(a0 + x_a A1 A2)``; gate ``g = sigmoid(x_g G1) G2``
* removal key ``kk = normalize(k * k_k)`` per head; ``k = k * (1 + (a - 1) * k_a)``
* value residual (layers > 0): ``v = v + (v_first - v) * sigmoid(v0 + x_v V1 V2)``
* state per head, laid out ``[value][key]``:
  ``S_t = S_{t-1} diag(w_t) - (S_{t-1} kk_t)(kk_t * a_t)^T + v_t k_t^T`` and ``y_t = S_t r_t``
* ``y = GroupNorm_H(y) + (sum_head(r * k * r_k)) v``, output ``(y * g) W_o``
* channel mix: ``relu(x_k K)^2 V`` on the shifted input.

Vocabulary: the model may be trained on a *local* vocabulary (only the world-tokenizer ids
that occur in the corpus), which makes the output layer, by far the largest cost for a
65536-token vocabulary and a narrow model, much cheaper. :func:`expand_to_world` turns such
a state dict into a full 65536-row checkpoint.

"Bias channel": with ``bias_channel=True`` the last channel of the final layer norm always
outputs exactly 1 (its weight is 0 and its bias 1), so column ``C-1`` of the head acts as a
per-token logit bias. Expanding to the world vocabulary uses it to give tokens that never
occurred in training a large negative logit, so the demo model never emits them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..demo import UNSEEN_LOGIT, expand_to_world  # the runtime's part, re-exported for the trainer
from ..engine.v7 import DECAY_SCALE  # w = exp(-DECAY_SCALE * sigmoid(.)), so w lies in (0.545, 1)
from ..engine.ops import torch_ref  # the engine's one Python copy of the recurrence (chunked for long inputs)

__all__ = ["DECAY_SCALE", "LN_X_EPS", "RWKV7", "RWKV7Config", "expand_to_world"]


LN_X_EPS = 64e-5  # GroupNorm eps used by RWKV-7 runtimes (head size 64 convention)


@dataclass
class RWKV7Config:
    vocab_size: int
    n_embd: int = 128
    n_layer: int = 2
    head_size: int = 64
    dim_w: int = 32  # LoRA rank of the decay
    dim_a: int = 32  # LoRA rank of the in-context learning rate
    dim_v: int = 16  # LoRA rank of the value-residual mix
    dim_g: int = 64  # LoRA rank of the output gate
    ffn_mult: int = 4
    bias_channel: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return asdict(self)


def _ortho(rows: int, cols: int, gain: float) -> torch.Tensor:
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w, gain=gain)
    return w


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Previous token's vector at every position ([B, T, C]); zeros before the first."""
    return F.pad(x, (0, 0, 1, -1))


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        C, H, N, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer
        self.layer_id, self.n_head, self.head_size = layer_id, H, N

        depth = layer_id / max(L - 1, 1)  # 0 at the bottom, 1 at the top
        shallow = 1.0 - layer_id / L  # 1 at the bottom, towards 0 at the top
        ramp = torch.arange(C, dtype=torch.float32) / C

        def mix(power: float) -> nn.Parameter:
            return nn.Parameter((1.0 - ramp.pow(power * shallow)).view(1, 1, C))

        self.x_r, self.x_w, self.x_k = mix(0.2), mix(0.9), mix(0.7)
        self.x_v, self.x_a, self.x_g = mix(0.7), mix(0.9), mix(0.2)

        # Decay: fast-forgetting channels at the start of each layer, slow ones at the end.
        speed = -7.0 + 5.0 * (torch.arange(C) / max(C - 1, 1)) ** (0.85 + depth**0.5)
        self.w0 = nn.Parameter((speed + 0.5).view(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, cfg.dim_w))
        self.w2 = nn.Parameter(_ortho(cfg.dim_w, C, 0.1))

        self.a0 = nn.Parameter(torch.zeros(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, cfg.dim_a))
        self.a2 = nn.Parameter(_ortho(cfg.dim_a, C, 0.1))

        if layer_id > 0:  # layer 0 provides v_first and has no value-residual mix
            self.v0 = nn.Parameter(torch.ones(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, cfg.dim_v))
            self.v2 = nn.Parameter(_ortho(cfg.dim_v, C, 0.1))

        self.g1 = nn.Parameter(torch.zeros(C, cfg.dim_g))
        self.g2 = nn.Parameter(_ortho(cfg.dim_g, C, 0.1))

        self.k_k = nn.Parameter(torch.full((1, 1, C), 0.85))
        self.k_a = nn.Parameter(torch.ones(1, 1, C))
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))

        bound = 0.5 / math.sqrt(C)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        for lin in (self.receptance, self.key, self.value):
            nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.zeros_(self.output.weight)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)
        with torch.no_grad():
            self.ln_x.weight.fill_(((1 + layer_id) / L) ** 0.7)

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        dx = _shift(x) - x
        xr, xw, xk = x + dx * self.x_r, x + dx * self.x_w, x + dx * self.x_k
        xv, xa, xg = x + dx * self.x_v, x + dx * self.x_a, x + dx * self.x_g

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        w_logit = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        w = torch.exp(-DECAY_SCALE * torch.sigmoid(w_logit))

        with torch.autocast(x.device.type, enabled=False):  # the recurrence stays in float32
            f32 = [t.float() for t in (r, w, k, v, kk, a)]
            y, _ = torch_ref.wkv7(*(t.unflatten(-1, (H, N)) for t in f32), x.new_zeros(B, H, N, N, dtype=torch.float32))
            y = y.reshape(B, T, C)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r * k * self.r_k.view(1, 1, C)).view(B, T, H, N).sum(-1, keepdim=True)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), v_first


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        C = cfg.n_embd
        ramp = torch.arange(C, dtype=torch.float32) / C
        shallow = 1.0 - layer_id / cfg.n_layer
        self.x_k = nn.Parameter((1.0 - ramp.pow(shallow**4)).view(1, 1, C))
        self.key = nn.Linear(C, cfg.ffn_mult * C, bias=False)
        self.value = nn.Linear(cfg.ffn_mult * C, C, bias=False)
        bound = 0.5 / math.sqrt(C)
        nn.init.uniform_(self.key.weight, -bound, bound)
        nn.init.zeros_(self.value.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = x + (_shift(x) - x) * self.x_k
        return self.value(torch.relu(self.key(xk)) ** 2)


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int) -> None:
        super().__init__()
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dx, v_first = self.att(self.ln1(x), v_first)
        x = x + dx
        x = x + self.ffn(self.ln2(x))
        return x, v_first


class RWKV7(nn.Module):
    """RWKV-7 for training. ``forward(idx [B, T]) -> logits [B, T, vocab_size]``."""

    def __init__(self, cfg: RWKV7Config, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.cfg = cfg
        C, V = cfg.n_embd, cfg.vocab_size
        self.emb = nn.Embedding(V, C)
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)  # ln0 normalises whatever scale
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        nn.init.normal_(self.head.weight, std=0.5 / math.sqrt(C))
        mask = torch.ones(C)
        if cfg.bias_channel:
            mask[-1] = 0.0
        self.register_buffer("_ln_out_mask", mask, persistent=False)

    # -- model -------------------------------------------------------------------------------
    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """ln_out, with the bias channel (if any) pinned to 1."""
        w, b = self.ln_out_params()
        return F.layer_norm(x, (self.cfg.n_embd,), w, b, self.ln_out.eps)

    def ln_out_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.ln_out.weight * self._ln_out_mask
        b = self.ln_out.bias * self._ln_out_mask + (1.0 - self._ln_out_mask)
        return w, b

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0].ln0(self.emb(idx))
        v_first = None
        for block in self.blocks:
            x, v_first = block(x, v_first)
        return self._final_norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
        logits = self(idx).float()
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        if mask is None:
            return loss.mean()
        mask = mask.reshape(-1).to(loss.dtype)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    # -- optimiser helpers ---------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on the projection matrices only (not on vectors, LoRA zeros, emb)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            is_matrix = p.ndim == 2 and name.endswith(".weight") and "ln" not in name
            (decay if is_matrix and not name.startswith("emb") else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # -- export --------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """State dict in the official RWKV-7 layout (vocabulary = this model's vocabulary)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.state_dict().items():
            if name.startswith("_"):
                continue
            out[name] = t.detach().clone()
        w, b = self.ln_out_params()
        out["ln_out.weight"], out["ln_out.bias"] = w.detach().clone(), b.detach().clone()
        # Official checkpoints carry v0/v1/v2 in layer 0 too (runtimes ignore them there).
        C, D = self.cfg.n_embd, self.cfg.dim_v
        out["blocks.0.att.v0"] = torch.ones(1, 1, C)
        out["blocks.0.att.v1"] = torch.zeros(C, D)
        out["blocks.0.att.v2"] = torch.zeros(D, C)
        return {k: v.to(dtype).contiguous() for k, v in out.items()}
