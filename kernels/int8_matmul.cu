// Weight-only int8 matmul in QuantLinear's format: q [N, K] int8 row-major, scale [N, K / 32]
// float32 (one per group of 32 inputs),
//   y[m][n] = sum_k x[m][k] q[n][k] scale[n][k / 32]     (float32 accumulation)
//
// int8_gemv_kernel: one warp per output channel n. Each lane reads 16 weights at a time (one
// 16-byte load; consecutive lanes read consecutive 16-byte pieces of the row, so a warp reads 512
// contiguous bytes per step) and the matching 16 activations of up to ROWS activation rows, so each
// weight is read once from memory for ROWS rows. The warp then sums its 32 partial dot products
// with shuffles. Decode (one token) is ROWS = 1; short sequences run ROWS = 4 rows per block row.
//
// int8_dequantize_kernel: w = q * (scale per group of 32) in the activation dtype, for long sequences, where
// a dense matmul on the tensor cores beats any GEMV.
#include "common.cuh"

namespace rwkv {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = 32 * kWarpsPerBlock;

// 16 consecutive activations starting at p (16-byte aligned) as floats.
template <typename F>
__device__ __forceinline__ void load16(const F* p, float out[16]) {
    constexpr int per_load = 16 / sizeof(F);  // elements per 16-byte load
#pragma unroll
    for (int part = 0; part < 16 / per_load; ++part) {
        const uint4 raw = reinterpret_cast<const uint4*>(p)[part];
        const F* values = reinterpret_cast<const F*>(&raw);
#pragma unroll
        for (int e = 0; e < per_load; ++e) out[part * per_load + e] = to_float(values[e]);
    }
}

// The 16 signed bytes of a 16-byte load as floats.
__device__ __forceinline__ void unpack16(const int4 packed, float out[16]) {
    const int words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int word = 0; word < 4; ++word) {
#pragma unroll
        for (int byte = 0; byte < 4; ++byte) {
            out[4 * word + byte] = static_cast<float>(static_cast<int8_t>((words[word] >> (8 * byte)) & 0xff));
        }
    }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

template <typename F, int ROWS>
__global__ void __launch_bounds__(kThreads) int8_gemv_kernel(Int8MatmulProblem p) {
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;  // output channel of this warp
    const int m0 = blockIdx.y * ROWS;                               // first activation row
    const F* __restrict__ x = static_cast<const F*>(p.x);
    F* __restrict__ y = static_cast<F*>(p.y);

    float acc[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; ++m) acc[m] = 0.f;

    if (n < p.N) {  // no early return: every lane of every warp takes part in warp_sum below
        const int4* __restrict__ q_row = reinterpret_cast<const int4*>(p.q + static_cast<size_t>(n) * p.K);
        const int pieces = p.K / 16;
#pragma unroll 4
        for (int piece = lane; piece < pieces; piece += 32) {
            float weight[16];
            unpack16(q_row[piece], weight);
            const float group_scale = p.scale[static_cast<size_t>(n) * (p.K / 32) + piece / 2];
#pragma unroll
            for (int e = 0; e < 16; ++e) weight[e] *= group_scale;
#pragma unroll
            for (int m = 0; m < ROWS; ++m) {
                if (m0 + m < p.M) {
                    float act[16];
                    load16(x + static_cast<size_t>(m0 + m) * p.K + piece * 16, act);
#pragma unroll
                    for (int e = 0; e < 16; ++e) acc[m] += act[e] * weight[e];
                }
            }
        }
    }

#pragma unroll
    for (int m = 0; m < ROWS; ++m) acc[m] = warp_sum(acc[m]);

    if (n < p.N && lane == 0) {
#pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            if (m0 + m < p.M) y[static_cast<size_t>(m0 + m) * p.N + n] = from_float<F>(acc[m]);
        }
    }
}

template <typename F>
__global__ void int8_dequantize_kernel(int N, int K, const int8_t* __restrict__ q, const float* __restrict__ scale,
                                       F* __restrict__ w) {
    const size_t piece = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // 16 weights each
    if (piece * 16 >= static_cast<size_t>(N) * K) return;
    const float row_scale = scale[piece / 2];  // K % 32 == 0: [N, K / 32] flat, two pieces per group
    float weight[16];
    unpack16(reinterpret_cast<const int4*>(q)[piece], weight);

    constexpr int per_store = 16 / sizeof(F);
#pragma unroll
    for (int part = 0; part < 16 / per_store; ++part) {
        uint4 raw;
        F* values = reinterpret_cast<F*>(&raw);
#pragma unroll
        for (int e = 0; e < per_store; ++e) values[e] = from_float<F>(weight[part * per_store + e] * row_scale);
        reinterpret_cast<uint4*>(w + piece * 16)[part] = raw;
    }
}

}  // namespace rwkv

void rwkv_int8_matmul(RwkvDtype dtype, const Int8MatmulProblem& problem, cudaStream_t stream) {
    if (problem.M == 0 || problem.N == 0) return;
    const int rows = problem.M == 1 ? 1 : 4;
    const dim3 grid((problem.N + rwkv::kWarpsPerBlock - 1) / rwkv::kWarpsPerBlock, (problem.M + rows - 1) / rows);
    rwkv::dispatch_dtype(dtype, [&](auto tag) {
        using F = typename decltype(tag)::type;
        auto kernel = rows == 1 ? rwkv::int8_gemv_kernel<F, 1> : rwkv::int8_gemv_kernel<F, 4>;
        RWKV_LAUNCH(kernel, grid, rwkv::kThreads, stream, problem);
    });
}

void rwkv_int8_dequantize(RwkvDtype dtype, int N, int K, const int8_t* q, const float* scale, void* w,
                          cudaStream_t stream) {
    const size_t pieces = static_cast<size_t>(N) * K / 16;
    if (pieces == 0) return;
    constexpr int threads = 256;
    const unsigned blocks = static_cast<unsigned>((pieces + threads - 1) / threads);
    rwkv::dispatch_dtype(dtype, [&](auto tag) {
        using F = typename decltype(tag)::type;
        auto kernel = rwkv::int8_dequantize_kernel<F>;
        RWKV_LAUNCH(kernel, blocks, threads, stream, N, K, q, scale, static_cast<F*>(w));
    });
}
