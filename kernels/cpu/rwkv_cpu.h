/* The optional CPU kernels of rwkv-chat: the functions rwkv_chat/engine/cpu_kernels.py loads
   with ctypes. Built once per machine with the system C compiler (see kernel_cache.py):

       cc -O3 -march=native -fopenmp-simd -shared -fPIC -std=gnu11 -pthread rwkv_cpu.c -lm

   Every function has a plain-torch twin in the engine computing the same thing; tensors are
   contiguous, float32 unless a `*_bf16`/`bf` flag says bfloat16 (stored as uint16).

   * rk_gemv: several weight-times-vector products in one parallel task, weights in fp32, bf16,
     or int8 / int4 in groups of 32 inputs per fp16 scale (quant.py's format, stored in blocks of
     8 interleaved groups: quant.block_order), stored by output row ([out, in], a dot product per
     output) or, for fp32/bf16, by input row ([in, out], one scaled row added per *nonzero*
     input, which skips the zeros of relu^2 activations in the FFN). A job takes one vector or
     several (a batch: each weight row is read once for all, in tiles of rows x vectors, every
     pair computed exactly as it would be alone). int8 rows use AVX-512 VNNI u8 x s8 dot products
     on the activation rounded to 16 bits and split into two bytes (relative error ~1e-5, far
     below the int8 weight error); int4 rows unpack nibbles and dot them with the activation
     rounded to int8 per group (llama.cpp's Q4_0 x Q8_0); bf16 rows use AVX-512 BF16 dot products
     with fp32 accumulation. Without AVX-512 (most laptops), tiles of 8 lanes on AVX2 + FMA + F16C
     do the same sums: int8 rows as int16 x int16 (vpmaddwd) on the same 16-bit activation, int4
     through vpmaddubsw, bf16 widened to fp32 (rk_simd says which). Portable C loops otherwise.
     bf16 rows may also be widened to fp32 and dotted with the fp32 activation as it is (kind 4,
     the LoRA factors under fp32 activations).
   * rk_dequant_groups: int8 / int4 rows back to fp32 or bf16, for prefill's GEMMs.
   * rk_gemm_bf16: prefill's products for bf16 weights under fp32 activations: the activations
     rounded to bf16, AVX-512 BF16 dot products, fp32 results (torch's CPU bf16 GEMM only
     returns bf16).
   * rk_wkv4, rk_wkv5, rk_wkv7: the exact per-token WKV recurrences for any number of tokens
     (fp32), parallel over channels / heads; rk_v7_step and rk_group_norm_gate fuse one token's
     time-mix tail; rk_v7_layer and rk_v6_layer run one token through a whole layer in one call
     (fp32 activations, the projections as rk_gemv jobs), or one token of each of B sequences
     (a server's batch: the weights read once for all of them); rk_layers runs them all.
   * Threads: a small pool of its own in which the caller never waits for a helper thread that
     has not started; OpenMP's barrier does, which costs milliseconds per call when the machine is
     busy with other work. rk_set_spin sets how long idle helpers spin before sleeping. Calls
     made between torch's parallel ops (a prompt) run on torch's own OpenMP threads instead
     (rk_set_team), which are awake there while the pool's helpers would share their cores. */
#ifndef RWKV_CPU_H
#define RWKV_CPU_H

#include <stdint.h>

/* One weight-times-vector product for rk_gemv: y = W x. int8 / int4: `scale` points to the fp16
   group scales [out, ceil(in / 32)] (cast), and for int8 `tag` to one float per row: 32768 *
   sum over groups of scale * (sum of q in the group), the offset correction of u8 x s8 products;
   else `tag` is 0.
   flags: bits 0-3 kind (0 fp32, 1 bf16, 2 int8, 3 int4, 4 bf16 widened: times x as it is, not rounded to
   bf16; int8/int4/widened rows only), bit 4 layout
   (0 rows [out,in], 1 cols [in,out]), bit 8 x is bf16, bit 9 y is bf16, bit 10 int8 / int4 rows in blocks
   of 256 (quant.block_order), bit 11 int8 rows times x rounded to int8 per group of 32 (strategy i8a8; `tag`
   then 0), bits 32-47 the number M of
   vectors (0 means 1): x is [M, in] and y [M, out], each row computed exactly as it would be alone. */
typedef struct {
    const void *w; const float *scale; const void *x; void *y;
    int64_t n_out, n_in, flags, tag;
} job_t;

void rk_set_spin(int limit);
/* gomp_parallel: GOMP_parallel of the OpenMP runtime torch uses (NULL: keep the one given before); use: 1 to run
   parallel work on that runtime's threads (calls made between torch's parallel ops), 0 for the kernels' own pool */
void rk_set_team(void *gomp_parallel, int use);
/* 0, or -1 when n_jobs is over the limit */
int rk_gemv(int n_jobs, const job_t *jobs, int n_threads);
void rk_dequant_groups(int bits, int64_t r0, int64_t r1, int64_t n, const void *q, const void *scale, void *out,
                       int out_bf16, int n_threads);
/* y[T, N] (fp32, rows ldy floats apart) = x[T, K] (fp32, rounded to bf16) times W^T, W bf16 [N, K] (or with
   cols set, stored [K, N]: y = x W); fp32 sums (prefill's products for bf16 weights). 0, or -1 when out of memory */
int rk_gemm_bf16(int64_t T, int64_t N, int64_t K, const float *x, const void *w, float *y, int64_t ldy, int cols,
                 int n_threads);
/* 1 when rk_gemm_bf16 runs on AVX-512 BF16 instructions (else portable loops: slow) */
int rk_gemm_bf16_native(void);
/* the products' SIMD: 2 AVX-512 (16 lanes), 1 AVX2 + FMA (8 lanes), 0 none (portable loops) */
int rk_simd(void);
void rk_wkv4(int64_t T, int64_t C, const float *k, const float *v, const float *w, const float *u,
             const float *aa_in, const float *bb_in, const float *pp_in,
             float *aa_out, float *bb_out, float *pp_out, float *out, int n_threads);
void rk_wkv5(int64_t T, int64_t H, int64_t N, const float *r, const float *k, const float *v,
             const float *w, int64_t w_tstride, const float *u, const float *s_in, float *s_out, float *out,
             int n_threads);
void rk_wkv7(int64_t T, int64_t H, int64_t N, const float *r, const float *w, const float *k, const float *v,
             const float *kk, const float *a, const float *s_in, float *s_out, float *out, int n_threads);
void rk_group_norm_gate(int64_t H, int64_t N, const float *x, const void *ln_w, const void *ln_b, int ln_bf, float eps,
                        const void *g, int g_mode, int bf, void *y);
void rk_v7_step(int64_t H, int64_t N, int bf,
                const void *r, const void *k, const void *v, const void *w_lora, const void *a_lora, const void *g,
                const void *v_lora, const void *v_first, const float *w0, const void *a0, const void *k_k,
                const void *k_a, const void *v0, const void *r_k, const void *ln_w, const void *ln_b,
                const float *s_in, float *s_out, void *y, void *v_out);

/* One RWKV-7 layer for one token of B sequences (rk_v7_layer). Vectors are in the layer's dtype (pbf: bf16, else
   fp32) except w0 (fp32). lin: receptance, key, value, w1, a1, g1, v1 | w2, a2, g2, v2 | output |
   ffn key, ffn value, as rk_gemv jobs (x, y unused); v1 / v2 unused when has_v is 0 (layer 0). */
typedef struct {
    int64_t H, N, pbf, has_v;
    const void *ln1_w, *ln1_b, *ln2_w, *ln2_b, *mix, *x_k;
    const float *w0;
    const void *a0, *k_k, *k_a, *v0, *r_k, *lnx_w, *lnx_b;
    job_t lin[14];
} v7_layer_t;

/* B sequences, one token each (B = 1: a single conversation). x [B, C] fp32, updated in place;
   states: for each sequence six pointers, where its states are read and written in place:
   att_in, att_out, ffn_in, ffn_out (the token-shift states, layer dtype [C]), s_in, s_out (the
   WKV state [H][V][K], fp32); v_first_in: layer 0's values [B, C] (fp32, NULL in layer 0);
   v_first_out: where layer 0 writes them (NULL in other layers). */
void rk_v7_layer(const v7_layer_t *L, int64_t B, float *x, const void *states, const float *v_first_in,
                 float *v_first_out, int n_threads);

/* One RWKV-6 layer for one token (rk_v6_layer), as rk_v7_layer. decay, bonus, lnx: fp32 [C]. lin:
   maa_w1 | maa_w2 x5 (w k v r g) | receptance, key, value, gate, decay_w1 | decay_w2 | output |
   ffn receptance, ffn key | ffn value. */
typedef struct {
    int64_t H, N, pbf, unused;
    const void *ln1_w, *ln1_b, *ln2_w, *ln2_b, *maa_x, *maa, *ffn_maa;
    const float *decay, *bonus, *lnx_w, *lnx_b;
    job_t lin[16];
} v6_layer_t;

void rk_v6_layer(const v6_layer_t *L, int64_t B, float *x, const void *states, int n_threads);

/* Every layer of a model in one call: `version` 7 or 6, layers[i] the address of layer i's struct,
   states [n][B] six pointers each (as above), v_first [B, C] fp32 scratch (v7: layer 0's values). */
void rk_layers(int version, int64_t n, const int64_t *layers, int64_t B, float *x, const void *states,
               float *v_first, int n_threads);

#endif
