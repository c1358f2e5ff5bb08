// RWKV-4 WKV, sequence mode: one thread per (batch, channel) walks the T tokens.
//
// The state of a channel is (aa, bb, pp): aa / bb are the decayed sums of e^k v and e^k, both kept
// divided by e^pp, pp being the largest exponent seen so far (so nothing overflows). For token t:
//   y_t = (aa e^(pp - m) + v_t e^(u + k_t - m)) / (bb e^(pp - m) + e^(u + k_t - m)),  m = max(pp, u + k_t)
//   then the token joins the sums with the state first decayed by e^w (w < 0):
//   m' = max(w + pp, k_t);  aa <- aa e^(w + pp - m') + v_t e^(k_t - m');  bb likewise;  pp <- m'
#include "common.cuh"

namespace rwkv {

template <typename F>
__global__ void wkv4_kernel(Wkv4Problem p) {
    const int index = blockIdx.x * blockDim.x + threadIdx.x;  // batch * C + channel
    if (index >= p.B * p.C) return;
    const int b = index / p.C;
    const int c = index % p.C;
    const F* __restrict__ k = static_cast<const F*>(p.k);
    const F* __restrict__ v = static_cast<const F*>(p.v);
    F* __restrict__ y = static_cast<F*>(p.y);

    const float w = p.decay[c];
    const float u = p.first[c];
    float aa = p.aa[index], bb = p.bb[index], pp = p.pp[index];
    for (int t = 0; t < p.T; ++t) {
        const size_t at = (static_cast<size_t>(b) * p.T + t) * p.C + c;
        const float kt = to_float(k[at]);
        const float vt = to_float(v[at]);

        const float boosted = u + kt;
        float top = fmaxf(pp, boosted);
        float e_state = expf(pp - top), e_token = expf(boosted - top);
        y[at] = from_float<F>((e_state * aa + e_token * vt) / (e_state * bb + e_token));

        const float decayed = w + pp;
        top = fmaxf(decayed, kt);
        e_state = expf(decayed - top);
        e_token = expf(kt - top);
        aa = e_state * aa + e_token * vt;
        bb = e_state * bb + e_token;
        pp = top;
    }
    p.aa[index] = aa;
    p.bb[index] = bb;
    p.pp[index] = pp;
}

}  // namespace rwkv

void rwkv_wkv4_forward(RwkvDtype dtype, const Wkv4Problem& problem, cudaStream_t stream) {
    constexpr int threads = 128;
    const int blocks = (problem.B * problem.C + threads - 1) / threads;
    if (blocks == 0) return;
    rwkv::dispatch_dtype(dtype, [&](auto tag) {
        using F = typename decltype(tag)::type;
        auto kernel = rwkv::wkv4_kernel<F>;
        RWKV_LAUNCH(kernel, blocks, threads, stream, problem);
    });
}
