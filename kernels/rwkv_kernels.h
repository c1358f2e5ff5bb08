// Host-side interface of the rwkv-chat CUDA kernels.
//
// The .cu files implement these launchers with plain CUDA (no torch headers, so `nvcc -c` builds
// them alone); ops.cpp and ops_wkv.cpp bind them to torch. Every launcher enqueues its kernels on
// `stream` and returns at once; the caller checks cudaGetLastError().
//
// Layouts (all row-major, contiguous):
//   tokens   [B, T, H, N]  r, k, v, ... (N = head size; the wkv5_6/wkv7 builds fix N at compile
//                          time with -DRWKV_HEAD_SIZE=N)
//   v4       [B, T, C]     k, v, y; per-channel state aa, bb, pp [B, C]
//   int8     q [N_out, K]  weights, scale [N_out, K / 32], W ~= q * scale per group of 32; x [M, K], y [M, N_out]
// Activations are float32, float16 or bfloat16 (RwkvDtype); states, decays and scales are float32.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

enum class RwkvDtype : int { f32 = 0, f16 = 1, bf16 = 2 };

// RWKV-4: per channel, out_t = (aa + e^(u+k_t) v_t) / (bb + e^(u+k_t)) with every exponent shifted by
// the running maximum pp; then aa, bb, pp absorb token t with the per-step log decay w (< 0).
struct Wkv4Problem {
    int B, T, C;
    const void* k;      // [B, T, C]
    const void* v;      // [B, T, C]
    const float* decay; // [C]  w = -exp(time_decay)
    const float* first; // [C]  u = time_first
    float* aa;          // [B, C]  read and updated in place
    float* bb;          // [B, C]
    float* pp;          // [B, C]
    void* y;            // [B, T, C]
};

// RWKV-5.2 / RWKV-6: per head, S [K][V];  y_t = r_t (u k_t v_t^T + S);  S <- k_t v_t^T + diag(w) S.
// v5.2 has one decay per head channel, v6 one per token (per_token_decay).
struct Wkv5Problem {
    int B, T, H;
    bool per_token_decay;
    const void* r;          // [B, T, H, N]
    const void* k;          // [B, T, H, N]
    const void* v;          // [B, T, H, N]
    const float* decay;     // [H, N] (v5.2) or [B, T, H, N] (v6): the factor w in (0, 1)
    const float* bonus;     // [H, N]  u = time_faaaa
    const float* state_in;  // [B, H, N, N]  S[k][v]
    float* state_out;       // [B, H, N, N]  may be state_in (update in place)
    void* y;                // [B, T, H, N]
};

// RWKV-7: per head, S [V][K];  S <- S diag(w_t) + (S a_t) b_t^T + v_t k_t^T;  y_t = S r_t,
// with a_t = -kk_t and b_t = kk_t * ia_t (kk: the unit-length removal key, ia: in-context rate).
struct Wkv7Problem {
    int B, T, H;
    const void* r;          // [B, T, H, N]
    const float* decay;     // [B, T, H, N]  the factor w in (0, 1)
    const void* k;          // [B, T, H, N]
    const void* v;          // [B, T, H, N]
    const void* kk;         // [B, T, H, N]
    const void* a;          // [B, T, H, N]  ia
    const float* state_in;  // [B, H, N, N]  S[v][k]
    float* state_out;       // [B, H, N, N]  may be state_in (update in place)
    void* y;                // [B, T, H, N]
};

// y = x @ (q * group scales)^T with float32 accumulation. Needs K % 32 == 0 and 16-byte
// aligned x and q (each thread reads 16 weights at once).
struct Int8MatmulProblem {
    int M, K, N;
    const void* x;        // [M, K]
    const int8_t* q;      // [N, K]
    const float* scale;   // [N, K / 32]
    void* y;              // [M, N]
};

void rwkv_wkv4_forward(RwkvDtype dtype, const Wkv4Problem& problem, cudaStream_t stream);
void rwkv_wkv5_forward(RwkvDtype dtype, const Wkv5Problem& problem, cudaStream_t stream);
void rwkv_wkv7_forward(RwkvDtype dtype, const Wkv7Problem& problem, cudaStream_t stream);

// The head size the wkv5_6.cu / wkv7.cu objects were compiled for.
int rwkv_wkv_head_size();

// At most this many activation rows go through the GEMV kernel; longer inputs should dequantize
// (rwkv_int8_dequantize) and use a dense matmul, which reaches the tensor cores.
constexpr int kInt8GemvMaxRows = 16;
void rwkv_int8_matmul(RwkvDtype dtype, const Int8MatmulProblem& problem, cudaStream_t stream);
// w [N, K] = q * group scales in the activation dtype. Needs K % 32 == 0.
void rwkv_int8_dequantize(RwkvDtype dtype, int N, int K, const int8_t* q, const float* scale, void* w,
                          cudaStream_t stream);
