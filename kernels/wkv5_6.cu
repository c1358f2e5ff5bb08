// RWKV-5.2 and RWKV-6 WKV, sequence mode (v6 is v5.2 with a decay per token).
//
// Per head the state is S [K][V] (row = key channel, column = value channel). For token t:
//   y_t[i]    = sum_j r_t[j] (u[j] k_t[j] v_t[i] + S[j][i])
//   S[j][i]  <- w_t[j] S[j][i] + k_t[j] v_t[i]
// One thread block per (batch, head) and one thread per value channel i: thread i keeps column
// S[:][i] (N floats) in registers for the whole sequence, so loading and storing the state is
// coalesced (consecutive threads, consecutive columns). r, k, w of the current token are shared
// through shared memory.
#include "common.cuh"

#ifndef RWKV_HEAD_SIZE
#error "compile with -DRWKV_HEAD_SIZE=<head size>, e.g. -DRWKV_HEAD_SIZE=64"
#endif

namespace rwkv {

constexpr int N = RWKV_HEAD_SIZE;
static_assert(N % 4 == 0 && N >= 4 && N <= 256, "head size must be a multiple of 4 in [4, 256]");

template <typename F, bool PER_TOKEN_DECAY>
__global__ void __launch_bounds__(N) wkv5_kernel(Wkv5Problem p) {
    const int b = blockIdx.x / p.H;
    const int h = blockIdx.x % p.H;
    const int i = threadIdx.x;  // value channel
    const F* __restrict__ r_in = static_cast<const F*>(p.r);
    const F* __restrict__ k_in = static_cast<const F*>(p.k);
    const F* __restrict__ v_in = static_cast<const F*>(p.v);
    F* __restrict__ y_out = static_cast<F*>(p.y);

    const size_t head_state = (static_cast<size_t>(b) * p.H + h) * N * N;
    float s[N];  // s[j] = S[j][i]
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = p.state_in[head_state + j * N + i];

    __shared__ float r[N], k[N], w[N], u[N];
    u[i] = p.bonus[h * N + i];
    if (!PER_TOKEN_DECAY) w[i] = p.decay[h * N + i];

    for (int t = 0; t < p.T; ++t) {
        const size_t at = ((static_cast<size_t>(b) * p.T + t) * p.H + h) * N + i;
        __syncthreads();  // everyone is done with the previous token's vectors
        r[i] = to_float(r_in[at]);
        k[i] = to_float(k_in[at]);
        if (PER_TOKEN_DECAY) w[i] = p.decay[at];
        __syncthreads();

        const float v_i = to_float(v_in[at]);
        float y = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float kv = k[j] * v_i;
            y += r[j] * (u[j] * kv + s[j]);
            s[j] = s[j] * w[j] + kv;
        }
        y_out[at] = from_float<F>(y);
    }

#pragma unroll
    for (int j = 0; j < N; ++j) p.state_out[head_state + j * N + i] = s[j];
}

}  // namespace rwkv

int rwkv_wkv_head_size() { return rwkv::N; }

void rwkv_wkv5_forward(RwkvDtype dtype, const Wkv5Problem& problem, cudaStream_t stream) {
    const int blocks = problem.B * problem.H;
    if (blocks == 0) return;
    rwkv::dispatch_dtype(dtype, [&](auto tag) {
        using F = typename decltype(tag)::type;
        auto kernel = problem.per_token_decay ? rwkv::wkv5_kernel<F, true> : rwkv::wkv5_kernel<F, false>;
        RWKV_LAUNCH(kernel, blocks, rwkv::N, stream, problem);
    });
}
