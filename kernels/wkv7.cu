// RWKV-7 WKV ("generalised delta rule"), sequence mode.
//
// Per head the state is S [V][K] (row = value channel, column = key channel). For token t, with
// a = -kk_t and b = kk_t * ia_t (kk: unit-length removal key, ia: in-context learning rate):
//   sa[i]     = sum_j S[i][j] a[j]                      (what S currently says about kk)
//   S[i][j]  <- S[i][j] w_t[j] + sa[i] b[j] + v_t[i] k_t[j]
//   y_t[i]    = sum_j S[i][j] r_t[j]
// One thread block per (batch, head) and one thread per value channel i: thread i keeps row S[i][:]
// (N floats) in registers for the whole sequence, so both sums are private to the thread. The
// per-token vectors r, w, k, a, b are shared through shared memory.
#include "common.cuh"

#ifndef RWKV_HEAD_SIZE
#error "compile with -DRWKV_HEAD_SIZE=<head size>, e.g. -DRWKV_HEAD_SIZE=64"
#endif

namespace rwkv {

constexpr int N7 = RWKV_HEAD_SIZE;
static_assert(N7 % 4 == 0 && N7 >= 4 && N7 <= 256, "head size must be a multiple of 4 in [4, 256]");

template <typename F>
__global__ void __launch_bounds__(N7) wkv7_kernel(Wkv7Problem p) {
    constexpr int N = N7;
    const int b = blockIdx.x / p.H;
    const int h = blockIdx.x % p.H;
    const int i = threadIdx.x;  // value channel
    const F* __restrict__ r_in = static_cast<const F*>(p.r);
    const F* __restrict__ k_in = static_cast<const F*>(p.k);
    const F* __restrict__ v_in = static_cast<const F*>(p.v);
    const F* __restrict__ kk_in = static_cast<const F*>(p.kk);
    const F* __restrict__ ia_in = static_cast<const F*>(p.a);
    F* __restrict__ y_out = static_cast<F*>(p.y);

    // Row i of this head's state: N contiguous floats, read and written 16 bytes at a time.
    const size_t row = ((static_cast<size_t>(b) * p.H + h) * N + i) * N;
    const float4* row_in = reinterpret_cast<const float4*>(p.state_in + row);
    float4* row_out = reinterpret_cast<float4*>(p.state_out + row);
    float s[N];
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
        const float4 q = row_in[j];
        s[4 * j] = q.x; s[4 * j + 1] = q.y; s[4 * j + 2] = q.z; s[4 * j + 3] = q.w;
    }

    __shared__ float r[N], w[N], k[N], a[N], bb[N];
    for (int t = 0; t < p.T; ++t) {
        const size_t at = ((static_cast<size_t>(b) * p.T + t) * p.H + h) * N + i;
        __syncthreads();  // everyone is done with the previous token's vectors
        r[i] = to_float(r_in[at]);
        w[i] = p.decay[at];
        k[i] = to_float(k_in[at]);
        const float kk = to_float(kk_in[at]);
        a[i] = -kk;
        bb[i] = kk * to_float(ia_in[at]);
        __syncthreads();

        float sa = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) sa += s[j] * a[j];

        const float v_i = to_float(v_in[at]);
        float y = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            s[j] = s[j] * w[j] + sa * bb[j] + v_i * k[j];
            y += s[j] * r[j];
        }
        y_out[at] = from_float<F>(y);
    }

#pragma unroll
    for (int j = 0; j < N / 4; ++j) row_out[j] = make_float4(s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3]);
}

}  // namespace rwkv

void rwkv_wkv7_forward(RwkvDtype dtype, const Wkv7Problem& problem, cudaStream_t stream) {
    const int blocks = problem.B * problem.H;
    if (blocks == 0) return;
    rwkv::dispatch_dtype(dtype, [&](auto tag) {
        using F = typename decltype(tag)::type;
        auto kernel = rwkv::wkv7_kernel<F>;
        RWKV_LAUNCH(kernel, blocks, rwkv::N7, stream, problem);
    });
}
