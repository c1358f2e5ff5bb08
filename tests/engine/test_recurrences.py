"""Every copy of each WKV recurrence against the recurrence written out here from its definition.

The references below are plain loops over scalars in float64, written from the formulas (not
from the engine's code): a sign or index slip in any implementation (the per-token loop, the
chunked forms, the C kernels, the CUDA kernels' torch twins, the trainer's batched use) changes numbers
far beyond the tolerance.  Inputs keep every term of the same size, so no term can hide.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_chat.engine import cpu_kernels, cuda
from rwkv_chat.engine.ops import torch_ref

T, H, N = 8, 2, 8  # tokens, heads, head size
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 implementations against a float64 reference


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(got, want, what):
    torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m: f"{what}: {m}")


def _c_kernels():
    return cpu_kernels.get()


# ---------------------------------------------------------------------------------------------
# RWKV-7: S_t = S_{t-1} diag(w_t) - (S_{t-1} kk_t) (kk_t * a_t)^T + v_t k_t^T ;  y_t = S_t r_t
# per head, S[i][j] with i a value channel and j a key channel.


def reference_wkv7(r, w, k, v, kk, a, state):
    """[T,H,N] inputs, state [H,N(value),N(key)] -> (y [T,H,N], final state), float64."""
    S = state.double().tolist()
    y = torch.zeros(r.shape, dtype=torch.float64)
    r, w, k, v, kk, a = (t.double().tolist() for t in (r, w, k, v, kk, a))
    for t in range(len(r)):
        for h in range(len(S)):
            s = S[h]
            n = len(s)
            removed = [sum(s[i][j] * kk[t][h][j] for j in range(n)) for i in range(n)]  # S kk
            for i in range(n):
                for j in range(n):
                    s[i][j] = (s[i][j] * w[t][h][j] - removed[i] * kk[t][h][j] * a[t][h][j]
                               + v[t][h][i] * k[t][h][j])
            for i in range(n):
                y[t, h, i] = sum(s[i][j] * r[t][h][j] for j in range(n))
    return y, torch.tensor(S, dtype=torch.float64)


@pytest.fixture(scope="module")
def v7_case():
    r, k, v = _rand(T, H, N, seed=1), _rand(T, H, N, seed=2), _rand(T, H, N, seed=3)
    kk = F.normalize(_rand(T, H, N, seed=4), dim=-1)
    a = torch.sigmoid(_rand(T, H, N, seed=5))
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(2 * _rand(T, H, N, seed=6)))  # (0.545, 1), as the model's
    state = 0.5 * _rand(H, N, N, seed=7)
    case = {name: t.float() for name, t in dict(r=r, w=w, k=k, v=v, kk=kk, a=a, state=state).items()}
    return case, reference_wkv7(**case)


def _v7_engine(c):
    return torch_ref.wkv7(c["r"], c["w"], c["k"], c["v"], c["kk"], c["a"], c["state"])


def _v7_c_kernel(c):
    kernels = _c_kernels()
    if kernels is None:
        pytest.skip("the CPU C kernels are not available here")
    return kernels.wkv7(c["r"], c["w"], c["k"], c["v"], c["kk"], c["a"], c["state"])


def _v7_cuda_twin(c):
    return cuda.torch_wkv7(c["r"], c["w"], c["k"], c["v"], c["kk"], c["a"], c["state"])


def _v7_batched(c):
    """Two sequences at once (the trainer's layout): the second is the first reversed in time."""
    both = {n: torch.stack([c[n], c[n].flip(0) if n != "state" else c[n]]) for n in c}
    y, state = torch_ref.wkv7(*(both[n] for n in ("r", "w", "k", "v", "kk", "a", "state")))
    want_y, want_state = reference_wkv7(**{n: both[n][1] for n in c})
    _close(y[1], want_y, "v7 batched output, second sequence")
    _close(state[1], want_state, "v7 batched state, second sequence")
    return y[0], state[0]


V7_IMPLEMENTATIONS = {
    "engine": _v7_engine, "c-kernel": _v7_c_kernel, "cuda-twin": _v7_cuda_twin,
    "loop": lambda c: torch_ref.wkv7_loop(*(c[n] for n in ("r", "w", "k", "v", "kk", "a", "state"))),
    "chunked": lambda c: torch_ref.wkv7_chunked(*(c[n] for n in ("r", "w", "k", "v", "kk", "a", "state")), chunk=3),  # 3, 3, 2 tokens
    "batched (trainer)": _v7_batched,
}


@pytest.mark.parametrize("name", V7_IMPLEMENTATIONS)
def test_wkv7_matches_the_written_out_recurrence(v7_case, name):
    case, (want_y, want_state) = v7_case
    y, state = V7_IMPLEMENTATIONS[name](case)
    _close(y, want_y, f"v7 {name} output")
    if state is not None:
        _close(state, want_state, f"v7 {name} state")


def test_the_v7_reference_is_sensitive_to_each_term(v7_case):
    """The removal and the decay both move the result (so a dropped or flipped term shows)."""
    case, (want_y, _) = v7_case
    no_removal, _ = reference_wkv7(**{**case, "a": torch.zeros_like(case["a"])})
    no_decay, _ = reference_wkv7(**{**case, "w": torch.ones_like(case["w"])})
    scale = want_y.abs().max()
    assert (no_removal - want_y).abs().max() > 0.05 * scale
    assert (no_decay - want_y).abs().max() > 0.05 * scale


# ---------------------------------------------------------------------------------------------
# RWKV-5.2 / 6: y_t = r_t (u * k_t v_t^T + S_{t-1}) ;  S_t = k_t v_t^T + w_t * S_{t-1}
# per head, S[i][j] with i a key channel and j a value channel; w per key channel (v6: per token).


def reference_wkv5(r, k, v, w, u, state):
    """r, k, v [T,H,N]; w [H,N] or [T,H,N]; u [H,N]; state [H,N(key),N(value)]."""
    S = state.double().tolist()
    per_token = w.dim() == 3
    y = torch.zeros(r.shape, dtype=torch.float64)
    r, k, v, w, u = (t.double().tolist() for t in (r, k, v, w, u))
    for t in range(len(r)):
        decay = w[t] if per_token else w
        for h in range(len(S)):
            s = S[h]
            n = len(s)
            for j in range(n):
                y[t, h, j] = sum(r[t][h][i] * (u[h][i] * k[t][h][i] * v[t][h][j] + s[i][j]) for i in range(n))
            for i in range(n):
                for j in range(n):
                    s[i][j] = k[t][h][i] * v[t][h][j] + decay[h][i] * s[i][j]
    return y, torch.tensor(S, dtype=torch.float64)


@pytest.fixture(scope="module", params=["v5.2", "v6"])
def v5_case(request):
    per_token = request.param == "v6"
    r, k, v = _rand(T, H, N, seed=11), _rand(T, H, N, seed=12), _rand(T, H, N, seed=13)
    w = torch.exp(-torch.exp(_rand(*((T, H, N) if per_token else (H, N)), seed=14) - 1))  # (0, 1)
    u = 0.5 + 0.5 * _rand(H, N, seed=15)
    state = 0.5 * _rand(H, N, N, seed=16)
    case = {name: t.float() for name, t in dict(r=r, k=k, v=v, w=w, u=u, state=state).items()}
    return request.param, case, reference_wkv5(**case)


def _v5_engine_layout(c):
    """The engine's layout: decay [H,K,1] (v5.2) or [T,H,K,1] (v6), bonus [H,K,1]."""
    return c["r"], c["k"], c["v"], c["w"].unsqueeze(-1), c["u"].unsqueeze(-1), c["state"]


def _v5_c_kernel(c):
    kernels = _c_kernels()
    if kernels is None:
        pytest.skip("the CPU C kernels are not available here")
    return kernels.wkv5(c["r"], c["k"], c["v"], c["w"], c["u"], c["state"])


V5_IMPLEMENTATIONS = {
    "engine": lambda c: torch_ref.wkv5(*_v5_engine_layout(c)),
    "loop": lambda c: torch_ref.wkv5_loop(*_v5_engine_layout(c)),
    "chunked": lambda c: torch_ref.wkv5_chunked(*_v5_engine_layout(c), chunk=3),  # chunks of 3, 3 and 2 tokens
    "c-kernel": _v5_c_kernel,
    "cuda-twin": lambda c: cuda.torch_wkv5(*_v5_engine_layout(c)),
}


@pytest.mark.parametrize("name", V5_IMPLEMENTATIONS)
def test_wkv5_matches_the_written_out_recurrence(v5_case, name):
    version, case, (want_y, want_state) = v5_case
    y, state = V5_IMPLEMENTATIONS[name](case)
    _close(y, want_y, f"{version} {name} output")
    _close(state, want_state, f"{version} {name} state")


# ---------------------------------------------------------------------------------------------
# RWKV-4, per channel, with the sums kept as (aa, bb, pp) = (num, den) / e^pp:
#   y_t = (num + e^(u + k_t) v_t) / (den + e^(u + k_t)) ;  num <- e^w num + e^k_t v_t ;
#   den <- e^w den + e^k_t     (w < 0 is the decay as stored by the engine: -exp(time_decay))


def reference_wkv4(k, v, w, u, aa, bb, pp):
    """-> (y [T,C], num [C], den [C]) in float64, without any shifting."""
    num = [x * math.exp(p) for x, p in zip(aa.double().tolist(), pp.double().tolist())]
    den = [x * math.exp(p) for x, p in zip(bb.double().tolist(), pp.double().tolist())]
    k, v, w, u = (t.double().tolist() for t in (k, v, w, u))
    y = torch.zeros(len(k), len(w), dtype=torch.float64)
    for t in range(len(k)):
        for c in range(len(w)):
            boost = math.exp(u[c] + k[t][c])
            y[t, c] = (num[c] + boost * v[t][c]) / (den[c] + boost)
            num[c] = math.exp(w[c]) * num[c] + math.exp(k[t][c]) * v[t][c]
            den[c] = math.exp(w[c]) * den[c] + math.exp(k[t][c])
    return y, torch.tensor(num, dtype=torch.float64), torch.tensor(den, dtype=torch.float64)


@pytest.fixture(scope="module")
def v4_case():
    C = 24
    k, v = _rand(T, C, seed=21), _rand(T, C, seed=22)
    w = -torch.exp(_rand(C, seed=23) - 1)
    u = 0.5 * _rand(C, seed=24)
    aa, bb, pp = _rand(C, seed=25), torch.rand(C, generator=torch.Generator().manual_seed(26)) + 0.5, _rand(C, seed=27)
    pp[::3] = -1e30  # fresh channels, as in a zero state
    case = {name: t.float() for name, t in dict(k=k, v=v, w=w, u=u, aa=aa, bb=bb, pp=pp).items()}
    return case, reference_wkv4(**case)


def _v4_c_kernel(c):
    kernels = _c_kernels()
    if kernels is None:
        pytest.skip("the CPU C kernels are not available here")
    return kernels.wkv4(*c.values())


V4_IMPLEMENTATIONS = {
    "engine": lambda c: torch_ref.wkv4(*c.values()),
    "c-kernel": _v4_c_kernel,
    "cuda-twin": lambda c: cuda.torch_wkv4(*c.values()),
}


@pytest.mark.parametrize("name", V4_IMPLEMENTATIONS)
def test_wkv4_matches_the_written_out_recurrence(v4_case, name):
    case, (want_y, want_num, want_den) = v4_case
    y, aa, bb, pp = V4_IMPLEMENTATIONS[name](case)
    _close(y, want_y, f"v4 {name} output")
    scale = torch.exp(pp.double())  # the sums are kept divided by e^pp
    _close(aa.double() * scale, want_num, f"v4 {name} numerator")
    _close(bb.double() * scale, want_den, f"v4 {name} denominator")
