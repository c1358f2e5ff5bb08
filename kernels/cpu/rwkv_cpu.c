/* The optional CPU kernels (interface and overview: rwkv_cpu.h). */
#include "rwkv_cpu.h"

#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RK_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RK_AVX2 1  /* also on AVX-512 machines: the 8-lane tiles cover what their 16-lane ones lack */
#endif
#if defined(RK_AVX512) || defined(RK_AVX2)
#include <immintrin.h>
#define RK_SIMD 1
#endif
/* int8 rows through the 8-lane tiles (int16 x int16 products), where AVX-512 VNNI is missing */
#if defined(RK_AVX2) && !(defined(RK_AVX512) && defined(__AVX512VNNI__))
#define RK_I8_MADD 1
#endif

/* ---------------------------------------------------------------- a small work-sharing pool
   The caller runs work units itself and helper threads join in when they are awake: the caller
   never waits for a helper that has not started (an OpenMP barrier would, which costs
   milliseconds per call on a busy machine). It only waits for helpers still inside the task,
   and they can only enter while units remain. One task at a time (a mutex serialises callers). */

typedef void (*unit_fn)(void *ctx, int64_t unit);
#define RK_MAX_HELPERS 63
static struct {
    _Atomic uint64_t state;   /* (epoch << 32) | helpers inside; odd epoch: a task is open */
    _Atomic int64_t next;     /* next unit to take */
    int64_t total;
    unit_fn fn;
    void *ctx;
    _Atomic int sleepers;
    _Atomic int wanted;       /* helpers allowed to join the current task */
    int n_helpers;
    pthread_mutex_t mu, call;
    pthread_cond_t cv;
} pool = { .mu = PTHREAD_MUTEX_INITIALIZER, .call = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

/* How long an idle helper spins before it sleeps. Short by default, so that it does not compete
   with torch's own threads between kernel calls; long while decoding one token at a time, when
   torch runs single-threaded and the kernel calls come every few tens of microseconds. */
static _Atomic int spin_limit = 2000;
void rk_set_spin(int limit) { atomic_store(&spin_limit, limit); }

static inline void rk_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void run_units(void) {
    for (;;) {
        int64_t u = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed);
        if (u >= pool.total) return;
        pool.fn(pool.ctx, u);
    }
}

static void *helper_main(void *arg) {
    int index = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        uint64_t s = atomic_load_explicit(&pool.state, memory_order_acquire);
        int spins = 0;
        while ((uint32_t)(s >> 32) == seen || !((s >> 32) & 1u)) {
            if (++spins < atomic_load_explicit(&spin_limit, memory_order_relaxed)) { rk_pause(); }
            else {
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleepers, 1);
                s = atomic_load_explicit(&pool.state, memory_order_acquire);
                while ((uint32_t)(s >> 32) == seen || !((s >> 32) & 1u)) {
                    pthread_cond_wait(&pool.cv, &pool.mu);
                    s = atomic_load_explicit(&pool.state, memory_order_acquire);
                }
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.mu);
                spins = 0;
            }
            s = atomic_load_explicit(&pool.state, memory_order_acquire);
        }
        seen = (uint32_t)(s >> 32);
        if (index >= atomic_load(&pool.wanted)) continue;
        /* enter only while this epoch is still open */
        uint64_t cur = s;
        int entered = 0;
        while (((cur >> 32) & 1u) && (uint32_t)(cur >> 32) == seen) {
            if (atomic_compare_exchange_weak_explicit(&pool.state, &cur, cur + 1, memory_order_acq_rel, memory_order_acquire)) {
                entered = 1; break;
            }
        }
        if (!entered) continue;
        run_units();
        atomic_fetch_sub_explicit(&pool.state, 1, memory_order_release);
    }
    return NULL;
}

static void pool_reset_after_fork(void) {
    pool.n_helpers = 0;
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.state, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.call, NULL);
    pthread_cond_init(&pool.cv, NULL);
}

static void pool_start(int helpers) {
    static int registered = 0;
    if (!registered) { pthread_atfork(NULL, NULL, pool_reset_after_fork); registered = 1; }
    if (helpers > RK_MAX_HELPERS) helpers = RK_MAX_HELPERS;
    while (pool.n_helpers < helpers) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &attr, helper_main, (void *)(intptr_t)pool.n_helpers) != 0) { pthread_attr_destroy(&attr); break; }
        pthread_attr_destroy(&attr);
        pool.n_helpers++;
    }
}

/* Torch's own OpenMP threads, for calls between torch's parallel ops (prefill): GOMP_parallel of the
   runtime torch loaded (rk_set_team). There, torch's idle workers spin for a while after each op, and
   a helper of the pool above would share a core with one of them instead of working. */
typedef void (*team_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static team_parallel_fn team_parallel = NULL;
static _Atomic int use_team = 0;
void rk_set_team(void *gomp_parallel, int use) {
    if (gomp_parallel) team_parallel = (team_parallel_fn)gomp_parallel;
    atomic_store(&use_team, use && team_parallel != NULL);
}

typedef struct { unit_fn fn; void *ctx; int64_t total; _Atomic int64_t next; } team_task_t;
static void team_worker(void *arg) {
    team_task_t *t = (team_task_t *)arg;
    for (;;) {
        int64_t u = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (u >= t->total) return;
        t->fn(t->ctx, u);
    }
}

/* Run fn(ctx, u) for u in [0, total) on the caller and up to n_threads - 1 helpers (the pool's, or
   torch's team when rk_set_team chose it). */
static void pool_run(unit_fn fn, void *ctx, int64_t total, int n_threads) {
    if (total <= 0) return;
    if (n_threads > 1 && total > 1 && atomic_load_explicit(&use_team, memory_order_relaxed)) {
        team_task_t task = { fn, ctx, total, 0 };
        team_parallel(team_worker, &task, (unsigned)n_threads, 0);
        return;
    }
    if (n_threads <= 1 || total == 1 || pthread_mutex_trylock(&pool.call) != 0) {
        for (int64_t u = 0; u < total; u++) fn(ctx, u);
        return;
    }
    pool_start(n_threads - 1);
    pool.fn = fn; pool.ctx = ctx; pool.total = total;
    atomic_store_explicit(&pool.next, 0, memory_order_relaxed);
    atomic_store(&pool.wanted, n_threads - 1);
    uint64_t s = atomic_load(&pool.state);
    uint64_t open_epoch = ((s >> 32) + 1) | 1u;   /* odd */
    atomic_store_explicit(&pool.state, open_epoch << 32, memory_order_release);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    run_units();
    /* close: the next (even) epoch, keeping the count of helpers inside */
    uint64_t cur = atomic_load(&pool.state);
    while (!atomic_compare_exchange_weak(&pool.state, &cur, ((open_epoch + 1) << 32) | (cur & 0xffffffffu))) {}
    while ((atomic_load_explicit(&pool.state, memory_order_acquire) & 0xffffffffu) != 0) rk_pause();
    pthread_mutex_unlock(&pool.call);
}

enum { K_F32 = 0, K_BF16 = 1, K_I8 = 2, K_I4 = 3, K_BF16_WIDE = 4 };
#define GROUP 32  /* weights per fp16 scale along the input (int8 and int4) */
#define RK_V7_DECAY_SCALE 0.6065306597126334f  /* e^-0.5: an RWKV-7 decay is exp(-e^-0.5 sigmoid(.)), v7.DECAY_SCALE */

/* job_t and its flags: see rwkv_cpu.h */

typedef struct {
    float *xf;        /* x as fp32 */
    int16_t *xq;      /* x rounded to int16 (int8 rows) */
    uint8_t *xlo, *xhi; /* its low byte and its high byte + 128 (in the weights' storage order) */
    int16_t *xqs;     /* ... xq in the weights' storage order, zero-padded to whole groups (RK_I8_MADD) */
    int8_t *x8;       /* int4 rows and int8 rows with RK_ACT8: x rounded to int8 per group of 32
                         (zero-padded to whole groups; in the weights' storage order) */
    float *xsl;       /* ... each group's scale, per 64 inputs as 16 lanes (8 per group) */
    int32_t *xnl;     /* ... minus each group's sum of x8 times the weights' offset / 8, in the same lanes */
    float *bxs;       /* ... per full block (flag BLOCKS), its 8 groups' scales twice (16 lanes) */
    int32_t *boff;    /* ... and minus its sum times the offset / 2, in the same lanes */
    uint16_t *xb;     /* x as bf16 (bf16 rows) */
    int32_t *nz;      /* indices of nonzero inputs (cols layout) */
    int64_t n_nz;
    float xs;         /* int16 scale */
    int64_t units;    /* cols layout: work units of this vector (blocks of its nonzero inputs) */
    int64_t rows_per_unit;  /* ... nonzero inputs per unit */
    float *part;      /* ... one partial sum [n_out] per unit, summed after the run */
    int bad;          /* x has a NaN or an infinity */
} prep_t;

static inline float bf16_to_f32(uint16_t v) { union { uint32_t u; float f; } c; c.u = (uint32_t)v << 16; return c.f; }
static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } c; c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);  /* NaN */
    uint32_t rounding = 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)((c.u + rounding) >> 16);
}

/* ---------------------------------------------------------------- rows layout: y[r] = W[r,:] . x
   With AVX-512, a tile of up to 4 rows times up to 4 vectors at a time: each weight chunk is
   loaded once for the tile's vectors and each vector chunk once for its rows, and every (row,
   vector) pair has its own accumulator, reduced at the end. A pair's arithmetic does not depend
   on the rest of the tile, so a vector's results are the same in any batch. Portable loops
   otherwise (one row and one vector at a time).

   Group-wise int8 and int4 rows (quant.py's format): W[r, k] = q[r, k] * scale[r, k / 32], the
   scales fp16. The dot product of each group of 32 is exact in int32 and scaled in fp32.

   int8: x is rounded to int16 for the whole vector and split as x = 256 * hi + lo (lo in [0, 255],
   hi in [-128, 127]); both bytes feed VNNI u8 x s8 products, hi offset by +128, which adds
   32768 * sum_g scale_g * sum(q in g) to every row: `corr` (one float per row, made at load).
   int4: q + 8 in [0, 15] is stored as nibbles, per 64 inputs byte i holding input i (low) and
   input i + 32 (high) (a last group of 32: i and i + 16); x is rounded to int8 per group of 32
   (llama.cpp's Q4_0 x Q8_0 dot), and the +8 offset comes off through the group sums of x.
   int8 with RK_ACT8: x rounded to int8 per group of 32 as for int4 (Q8_0 x Q8_0); VNNI takes
   q ^ 0x80 = q + 128 as its unsigned operand, and the offset comes off the same way. */
#define RK_BLOCK 256   /* int8 / int4 rows with flag BLOCKS: 8 groups interleaved (quant.block_order) */
#define RK_BLOCKS 1024 /* the job flag */
#define RK_ACT8 2048   /* the job flag: int8 rows times x rounded to int8 per group of 32 (W8A8, llama.cpp's
                          Q8_0 x Q8_0 dot) instead of to int16 for the whole vector */

/* where input k of a row of n inputs is stored: a full block holds in chunk j (64 bytes), lane l
   (4 bytes) the inputs 8j + 4 (l / 8) .. + 3 of its group l % 8; later inputs keep their place */
static inline int64_t stored_index(int64_t k, int64_t n, int blocks) {
    if (!blocks || k >= n / RK_BLOCK * RK_BLOCK) return k;
    int64_t g = (k % RK_BLOCK) / GROUP, o = k % GROUP;
    return k / RK_BLOCK * RK_BLOCK + (o / 8) * 64 + ((o % 8) / 4 * 8 + g) * 4 + o % 4;
}

static inline int32_t nibble(const uint8_t *row, int64_t k, int64_t n32) {
    int64_t base = k / 64 * 64, half = (n32 - base >= 64 ? 64 : n32 - base) / 2, i = k - base;
    uint8_t b = row[base / 2 + i % half];
    return (int32_t)(i < half ? b & 15 : b >> 4) - 8;
}

static inline float half_to_f32(uint16_t h) {
#ifdef RK_SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    union { uint32_t u; float f; } c;
    if (e == 0) { c.f = ldexpf((float)m, -24); c.u |= sign; return c.f; }
    c.u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    return c.f;
#endif
}

static void rows_portable(const job_t *jb, const prep_t *p, float *y, int64_t r0, int64_t r1) {
    int kind = (int)(jb->flags & 15), blocks = (jb->flags & RK_BLOCKS) != 0;
    int64_t n = jb->n_in, ng = (n + GROUP - 1) / GROUP, n32 = ng * GROUP;
    const uint16_t *scale = (const uint16_t *)jb->scale;
    for (int64_t r = r0; r < r1; r++) {
        float s = 0.f;
        if (kind == K_F32) {
            const float *w = (const float *)jb->w + r * n;
            for (int64_t c = 0; c < n; c++) s += w[c] * p->xf[c];
        } else if (kind == K_BF16) {
            const uint16_t *w = (const uint16_t *)jb->w + r * n;
            for (int64_t c = 0; c < n; c++) s += bf16_to_f32(w[c]) * bf16_to_f32(p->xb[c]);
        } else if (kind == K_BF16_WIDE) {
            const uint16_t *w = (const uint16_t *)jb->w + r * n;
            for (int64_t c = 0; c < n; c++) s += bf16_to_f32(w[c]) * p->xf[c];
        } else if (kind == K_I8 && !(jb->flags & RK_ACT8)) {
            const int8_t *w = (const int8_t *)jb->w + r * n;
            for (int64_t g = 0; g < ng; g++) {
                int64_t acc = 0;
                for (int64_t c = g * GROUP; c < n && c < (g + 1) * GROUP; c++)
                    acc += (int32_t)w[stored_index(c, n, blocks)] * (int32_t)p->xq[c];
                s += (float)acc * half_to_f32(scale[r * ng + g]);
            }
            s *= p->xs;
        } else {  /* int4, or int8 with RK_ACT8: x rounded to int8 per group (x8, zero past n) */
            const int8_t *w8 = (const int8_t *)jb->w + r * n;
            const uint8_t *w4 = (const uint8_t *)jb->w + r * (n32 / 2);
            for (int64_t g = 0; g < ng; g++) {
                int32_t acc = 0;
                for (int64_t c = g * GROUP; c < n && c < (g + 1) * GROUP; c++) {
                    int64_t at = stored_index(c, n, blocks);
                    acc += (kind == K_I8 ? (int32_t)w8[at] : nibble(w4, at, n32)) * (int32_t)p->x8[at];
                }
                s += (float)acc * half_to_f32(scale[r * ng + g]) * p->xsl[g * 8];
            }
        }
        y[r] = s;
    }
}

#ifdef RK_SIMD
#define RK_TILE 4  /* rows and vectors of a tile */
#define RK_ALWAYS_INLINE static inline __attribute__((always_inline))

/* tile(R, M) for R, M in 1..4 as compile-time constants, so the accumulators stay in registers */
#define RK_SPECIALIZE(TILE) switch ((R - 1) * 4 + (M - 1)) { \
    case 0: TILE(1, 1); break;  case 1: TILE(1, 2); break;  case 2: TILE(1, 3); break;  case 3: TILE(1, 4); break; \
    case 4: TILE(2, 1); break;  case 5: TILE(2, 2); break;  case 6: TILE(2, 3); break;  case 7: TILE(2, 4); break; \
    case 8: TILE(3, 1); break;  case 9: TILE(3, 2); break;  case 10: TILE(3, 3); break; case 11: TILE(3, 4); break; \
    case 12: TILE(4, 1); break; case 13: TILE(4, 2); break; case 14: TILE(4, 3); break; default: TILE(4, 4); break; }

/* acc[i][j]: row r0 + i times vector j, reduced into ys[j][r0 + i] at the end */
#define RK_TILE_ZERO(acc, zero) for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) acc[i][j] = zero
#endif

#ifdef RK_AVX512

/* the sums of four accumulators' lanes, each in a fixed order (whichever others come with it) */
static inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
#define RK_HALVES(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(RK_HALVES(a0), RK_HALVES(a1)), _mm256_hadd_ps(RK_HALVES(a2), RK_HALVES(a3)));
#undef RK_HALVES
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* a row's sums for M vectors (M <= 4) in one reduction */
RK_ALWAYS_INLINE void store_row_sums(const __m512 *acc, const int M, float *const *ys, int64_t r) {
    const __m512 zero = _mm512_setzero_ps();
    float sums[4];
    _mm_storeu_ps(sums, sum4(acc[0], M > 1 ? acc[1] : zero, M > 2 ? acc[2] : zero, M > 3 ? acc[3] : zero));
    for (int j = 0; j < M; j++) ys[j][r] = sums[j];
}

/* 16 weights of a row as fp32: fp32 rows, or bf16 rows widened (wide: a compile-time constant) */
RK_ALWAYS_INLINE __m512 weights16(const void *W, const int wide, int64_t at, __mmask16 mk) {
    if (wide)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)W + at)), 16));
    return _mm512_maskz_loadu_ps(mk, (const float *)W + at);
}

/* fp32 rows, or bf16 rows widened to fp32 (K_BF16_WIDE), times the fp32 input as it is */
RK_ALWAYS_INLINE void tile_f32(const void *W, const int wide, const prep_t *const *ps, float *const *ys, int64_t r0,
                               const int R, const int M, int64_t n) {
    __m512 acc[RK_TILE][RK_TILE];
    RK_TILE_ZERO(acc, _mm512_setzero_ps());
    for (int64_t c = 0; c < n; c += 16) {
        __mmask16 mk = n - c >= 16 ? 0xffff : (__mmask16)((1u << (n - c)) - 1);
        __m512 w[RK_TILE];
        for (int i = 0; i < R; i++) w[i] = weights16(W, wide, (r0 + i) * n + c, mk);
        for (int j = 0; j < M; j++) {
            __m512 x = _mm512_maskz_loadu_ps(mk, ps[j]->xf + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_fmadd_ps(w[i], x, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++) store_row_sums(acc[i], M, ys, r0 + i);
}

#ifdef __AVX512BF16__
RK_ALWAYS_INLINE void tile_bf16(const uint16_t *W, const prep_t *const *ps, float *const *ys, int64_t r0, const int R,
                                const int M, int64_t n) {
    __m512 acc[RK_TILE][RK_TILE];
    RK_TILE_ZERO(acc, _mm512_setzero_ps());
    for (int64_t c = 0; c < n; c += 32) {
        __mmask32 mk = n - c >= 32 ? 0xffffffffu : (__mmask32)((1u << (n - c)) - 1);
        __m512i w[RK_TILE];
        for (int i = 0; i < R; i++) w[i] = _mm512_maskz_loadu_epi16(mk, W + (r0 + i) * n + c);
        for (int j = 0; j < M; j++) {
            __m512i x = _mm512_maskz_loadu_epi16(mk, ps[j]->xb + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i], (__m512bh)x);
        }
    }
    for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) ys[j][r0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif

#ifdef __AVX512VNNI__
/* lanes 0-7: the scale of group g, lanes 8-15: of group g + 1 (0 past the last group) */
static inline __m512 pair_scales(const uint16_t *s, int64_t g, int64_t n_groups) {
    __m128i two = _mm_maskz_loadu_epi16(g + 1 < n_groups ? 3 : 1, s + g);
    const __m256i idx = _mm256_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_cvtph_ps(_mm256_permutexvar_epi16(idx, _mm256_castsi128_si256(two)));
}

/* int8 and int4 tiles: first the full blocks of 8 groups (quant.block_order: each int32 lane
   sums one group over the block's four chunks, then one conversion and scaling per block), then
   the inputs past them as pairs of groups (lanes 0-7 one group, 8-15 the next), scaled per chunk. */
static inline __m512 block_scales(const uint16_t *s) {  /* 8 groups' scales, twice */
    return _mm512_cvtph_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)s)));
}

RK_ALWAYS_INLINE void tile_i8(const int8_t *W, const uint16_t *S, const float *corr, const prep_t *const *ps,
                              float *const *ys, int64_t r0, const int R, const int M, int64_t n, int blocks) {
    int64_t ng = (n + GROUP - 1) / GROUP, nb = blocks ? n / RK_BLOCK : 0;
    __m512 acc[RK_TILE][RK_TILE];
    RK_TILE_ZERO(acc, _mm512_setzero_ps());
    for (int64_t b = 0; b < nb; b++) {
        int64_t base = b * RK_BLOCK;
        __m512i hi[RK_TILE][RK_TILE], lo[RK_TILE][RK_TILE];
        for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) hi[i][j] = lo[i][j] = _mm512_setzero_si512();
        for (int64_t c = base; c < base + RK_BLOCK; c += 64) {
            __m512i w[RK_TILE];
            for (int i = 0; i < R; i++) {
                _mm_prefetch((const char *)(W + (r0 + 4 + i) * n + c), _MM_HINT_T0);  /* 4 rows ahead */
                w[i] = _mm512_loadu_si512(W + (r0 + i) * n + c);
            }
            for (int j = 0; j < M; j++) {
                __m512i h = _mm512_loadu_si512(ps[j]->xhi + c), l = _mm512_loadu_si512(ps[j]->xlo + c);
                for (int i = 0; i < R; i++) {
                    hi[i][j] = _mm512_dpbusd_epi32(hi[i][j], h, w[i]);
                    lo[i][j] = _mm512_dpbusd_epi32(lo[i][j], l, w[i]);
                }
            }
        }
        for (int i = 0; i < R; i++) {
            __m512 s = block_scales(S + (r0 + i) * ng + b * 8);
            /* 256 * (hi . q) + lo . q, exact in int32: |hi . q| <= 16 * 255 * 127 per lane */
            for (int j = 0; j < M; j++)
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi[i][j], 8), lo[i][j])),
                                            s, acc[i][j]);
        }
    }
    for (int64_t c = nb * RK_BLOCK; c < n; c += 64) {
        __mmask64 mk = n - c >= 64 ? ~0ull : (~0ull) >> (64 - (n - c));
        __m512i w[RK_TILE];
        __m512 s[RK_TILE];
        for (int i = 0; i < R; i++) {
            w[i] = _mm512_maskz_loadu_epi8(mk, W + (r0 + i) * n + c);
            s[i] = pair_scales(S + (r0 + i) * ng, c / GROUP, ng);
        }
        for (int j = 0; j < M; j++) {
            __m512i lo = _mm512_maskz_loadu_epi8(mk, ps[j]->xlo + c), hi = _mm512_maskz_loadu_epi8(mk, ps[j]->xhi + c);
            for (int i = 0; i < R; i++) {
                __m512i d = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, w[i]), 8);
                d = _mm512_dpbusd_epi32(d, lo, w[i]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s[i], acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < M; j++) ys[j][r0 + i] = (_mm512_reduce_add_ps(acc[i][j]) - corr[r0 + i]) * ps[j]->xs;
}

RK_ALWAYS_INLINE __m512i unpack_nibbles(const uint8_t *p) {  /* 32 bytes -> their 64 nibbles (low ones first) */
    const __m256i low = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
}

/* 64 stored weights of a row as u8 for vpdpbusd: int4 nibbles (q + 8), or int8 q ^ 0x80 (q + 128);
   mk: the inputs left in a row's last chunk (int8; int4 rows are padded to whole groups) */
RK_ALWAYS_INLINE __m512i unsigned64(const void *W, const int bits, int64_t row, int64_t n32, int64_t n, int64_t c,
                                    __mmask64 mk) {
    if (bits == 8)
        return _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, (const int8_t *)W + row * n + c), _mm512_set1_epi8((char)0x80));
    const uint8_t *p = (const uint8_t *)W + row * (n32 / 2) + c / 2;
    if (c + 64 <= n32) return unpack_nibbles(p);
    /* a last group of 32: inputs i and i + 16 in byte i */
    __m128i v = _mm_loadu_si128((const __m128i *)p), l = _mm_set1_epi8(15);
    return _mm512_zextsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, l)),
                                                          _mm_and_si128(_mm_srli_epi16(v, 4), l), 1));
}

/* int4 rows, and int8 rows with RK_ACT8: unsigned weights (q plus an offset) times x rounded to int8
   per group; the offset comes off through the group sums of x (prep's boff / xnl) */
RK_ALWAYS_INLINE void tile_q8(const void *W, const int bits, const uint16_t *S, const prep_t *const *ps, float *const *ys,
                              int64_t r0, const int R, const int M, int64_t n, int blocks) {
    int64_t n32 = (n + GROUP - 1) / GROUP * GROUP, ng = n32 / GROUP, nb = blocks ? n / RK_BLOCK : 0;
    int64_t stride = bits == 8 ? n : n32 / 2;  /* bytes per row */
    __m512 acc[RK_TILE][RK_TILE];
    RK_TILE_ZERO(acc, _mm512_setzero_ps());
    for (int64_t b = 0; b < nb; b++) {
        int64_t base = b * RK_BLOCK;
        __m512i d[RK_TILE][RK_TILE];
        for (int j = 0; j < M; j++) {
            __m512i offset = _mm512_loadu_si512(ps[j]->boff + b * 16);
            for (int i = 0; i < R; i++) d[i][j] = offset;
        }
        for (int64_t c = base; c < base + RK_BLOCK; c += 64) {
            __m512i q[RK_TILE];
            for (int i = 0; i < R; i++) {
                _mm_prefetch((const char *)W + (r0 + 4 + i) * stride + c * bits / 8, _MM_HINT_T0);  /* 4 rows ahead */
                q[i] = unsigned64(W, bits, r0 + i, n32, n, c, ~0ull);
            }
            for (int j = 0; j < M; j++) {
                __m512i x = _mm512_loadu_si512(ps[j]->x8 + c);
                for (int i = 0; i < R; i++) d[i][j] = _mm512_dpbusd_epi32(d[i][j], q[i], x);
            }
        }
        for (int i = 0; i < R; i++) {
            __m512 s = block_scales(S + (r0 + i) * ng + b * 8);
            for (int j = 0; j < M; j++)
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][j]), _mm512_mul_ps(s, _mm512_loadu_ps(ps[j]->bxs + b * 16)),
                                            acc[i][j]);
        }
    }
    for (int64_t c = nb * RK_BLOCK; c < n32; c += 64) {
        __mmask64 mk = n - c >= 64 ? ~0ull : (~0ull) >> (64 - (n - c));
        __m512i q[RK_TILE];
        __m512 s[RK_TILE];
        for (int i = 0; i < R; i++) {
            q[i] = unsigned64(W, bits, r0 + i, n32, n, c, mk);
            s[i] = pair_scales(S + (r0 + i) * ng, c / GROUP, ng);
        }
        for (int j = 0; j < M; j++) {
            __m512i offset = _mm512_loadu_si512(ps[j]->xnl + c / 4), x = _mm512_loadu_si512(ps[j]->x8 + c);
            __m512 xs = _mm512_loadu_ps(ps[j]->xsl + c / 4);
            for (int i = 0; i < R; i++) {
                __m512i dd = _mm512_dpbusd_epi32(offset, q[i], x);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dd), _mm512_mul_ps(s[i], xs), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) ys[j][r0 + i] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif
#endif  /* RK_AVX512 */

#ifdef RK_AVX2
/* ------------------------------------------------ 8-lane tiles (AVX2 + FMA + F16C)
   The same tiles with 8 fp32 / int32 lanes, for machines without AVX-512 (or without its VNNI /
   BF16 instructions). int8 rows: x rounded to int16 as for VNNI, the weights sign-extended to
   int16, and vpmaddwd sums pairs of int16 x int16 products exactly in int32 (no offset to
   correct). int4 rows: nibble x int8 products through vpmaddubsw (at most 2 * 15 * 127 per
   pair: no saturation), summed to int32 by vpmaddwd with ones. */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 8 values from p + at as fp32 (bf: bf16 widened), or the count < 8 left, zero-padded */
RK_ALWAYS_INLINE __m256 load8(const void *p, const int bf, int64_t at) {
    if (bf)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + at))), 16));
    return _mm256_loadu_ps((const float *)p + at);
}
static inline __m256 load8_rest(const void *p, int bf, int64_t at, int64_t count) {
    float v[8] = { 0.f };
    for (int64_t i = 0; i < count; i++) v[i] = bf ? bf16_to_f32(((const uint16_t *)p)[at + i]) : ((const float *)p)[at + i];
    return _mm256_loadu_ps(v);
}

/* fp32 rows (wbf 0) or bf16 rows widened (wbf 1), times x as fp32 (xbf 0) or x rounded to bf16 (xbf 1: K_BF16) */
RK_ALWAYS_INLINE void tile8_f32(const void *W, const int wbf, const int xbf, const prep_t *const *ps, float *const *ys,
                                int64_t r0, const int R, const int M, int64_t n) {
    __m256 acc[RK_TILE][RK_TILE];
    RK_TILE_ZERO(acc, _mm256_setzero_ps());
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 w[RK_TILE];
        for (int i = 0; i < R; i++) w[i] = load8(W, wbf, (r0 + i) * n + c);
        for (int j = 0; j < M; j++) {
            __m256 x = xbf ? load8(ps[j]->xb, 1, c) : load8(ps[j]->xf, 0, c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm256_fmadd_ps(w[i], x, acc[i][j]);
        }
    }
    if (c < n)
        for (int i = 0; i < R; i++) {
            __m256 w = load8_rest(W, wbf, (r0 + i) * n + c, n - c);
            for (int j = 0; j < M; j++)
                acc[i][j] = _mm256_fmadd_ps(w, xbf ? load8_rest(ps[j]->xb, 1, c, n - c) : load8_rest(ps[j]->xf, 0, c, n - c),
                                            acc[i][j]);
        }
    for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) ys[j][r0 + i] = hsum8(acc[i][j]);
}

/* 8 fp16 scales as fp32, spread by idx (lanes to groups) */
static inline __m256 scales8(const uint16_t *s, __m256i idx) {
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s)), idx);
}

RK_ALWAYS_INLINE void tile8_i8(const int8_t *W, const uint16_t *S, const prep_t *const *ps, float *const *ys,
                               int64_t r0, const int R, const int M, int64_t n, int blocks) {
    int64_t ng = (n + GROUP - 1) / GROUP, nb = blocks ? n / RK_BLOCK : 0;
    /* in a full block, 16 stored bytes are 4 dwords of groups 0-3 (even 16-byte pieces) or 4-7 (odd),
       and vpmaddwd's lane k holds bytes 2k and 2k + 1: group k / 2 of those four */
    const __m256i low_groups = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), high_groups = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    __m256 acc[RK_TILE][RK_TILE];
    RK_TILE_ZERO(acc, _mm256_setzero_ps());
    for (int64_t b = 0; b < nb; b++) {
        __m256i lo[RK_TILE][RK_TILE], hi[RK_TILE][RK_TILE];
        for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) lo[i][j] = hi[i][j] = _mm256_setzero_si256();
        for (int64_t c = b * RK_BLOCK; c < (b + 1) * RK_BLOCK; c += 32) {  /* pieces 2k (groups 0-3) and 2k + 1 */
            for (int i = 0; i < R; i++) {
                const int8_t *row = W + (r0 + i) * n + c;
                __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)row));
                __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + 16)));
                for (int j = 0; j < M; j++) {
                    const __m256i *x = (const __m256i *)(ps[j]->xqs + c);
                    lo[i][j] = _mm256_add_epi32(lo[i][j], _mm256_madd_epi16(w0, _mm256_loadu_si256(x)));
                    hi[i][j] = _mm256_add_epi32(hi[i][j], _mm256_madd_epi16(w1, _mm256_loadu_si256(x + 1)));
                }
            }
        }
        for (int i = 0; i < R; i++) {
            const uint16_t *s = S + (r0 + i) * ng + b * 8;
            __m256 s_lo = scales8(s, low_groups), s_hi = scales8(s, high_groups);
            for (int j = 0; j < M; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi[i][j]), s_hi,
                                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[i][j]), s_lo, acc[i][j]));
        }
    }
    for (int64_t g = nb * 8; g < ng; g++) {  /* the inputs past the blocks, a group of 32 at a time */
        int64_t c = g * GROUP, len = n - c < GROUP ? n - c : GROUP;
        for (int i = 0; i < R; i++) {
            int8_t part[GROUP] = { 0 };
            memcpy(part, W + (r0 + i) * n + c, (size_t)len);
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)part));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(part + 16)));
            __m256 s = _mm256_set1_ps(half_to_f32(S[(r0 + i) * ng + g]));
            for (int j = 0; j < M; j++) {
                const __m256i *x = (const __m256i *)(ps[j]->xqs + c);
                __m256i d = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(x)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(x + 1)));
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) ys[j][r0 + i] = hsum8(acc[i][j]) * ps[j]->xs;
}

/* 64 nibbles from 32 bytes as bytes: the low nibbles (stored inputs 0-31), then the high ones (32-63) */
RK_ALWAYS_INLINE void nibbles8(const uint8_t *p, __m256i *low, __m256i *high) {
    const __m256i mask = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *low = _mm256_and_si256(v, mask);
    *high = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

/* q (bytes 0..15) times x (int8) in int32 lanes, each lane the sum of 4 neighbouring products */
RK_ALWAYS_INLINE __m256i dot4(__m256i q, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
}

/* int8 q times int8 x, as dot4 (vpmaddubsw takes |q| and x with q's sign: no offset) */
RK_ALWAYS_INLINE __m256i dot4_signed(__m256i q, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)), _mm256_set1_epi16(1));
}

/* 64 stored weights of a row from input c: int4 nibbles (q + 8: the offset is prep's) or int8 q
   (RK_ACT8; a last chunk of fewer than 64 zero-padded), as two halves of 32 bytes */
RK_ALWAYS_INLINE void weights64(const void *W, const int bits, int64_t row, int64_t n32, int64_t n, int64_t c,
                                __m256i *q0, __m256i *q1) {
    if (bits == 8) {
        const int8_t *p = (const int8_t *)W + row * n + c;
        if (n - c >= 64) {
            *q0 = _mm256_loadu_si256((const __m256i *)p);
            *q1 = _mm256_loadu_si256((const __m256i *)(p + 32));
            return;
        }
        int8_t part[64] = { 0 };
        memcpy(part, p, (size_t)(n - c));
        *q0 = _mm256_loadu_si256((const __m256i *)part);
        *q1 = _mm256_loadu_si256((const __m256i *)(part + 32));
        return;
    }
    const uint8_t *p = (const uint8_t *)W + row * (n32 / 2) + c / 2;
    *q1 = _mm256_setzero_si256();
    if (c + 64 <= n32) nibbles8(p, q0, q1);
    else {  /* a last group of 32: inputs i and i + 16 in byte i */
        __m128i v = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(15);
        *q0 = _mm256_setr_m128i(_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
    }
}

RK_ALWAYS_INLINE __m256i dot_q(const int bits, __m256i q, const int8_t *x) {
    __m256i v = _mm256_loadu_si256((const __m256i *)x);
    return bits == 8 ? dot4_signed(q, v) : dot4(q, v);
}

/* int4 rows, and int8 rows with RK_ACT8 */
RK_ALWAYS_INLINE void tile8_q8(const void *W, const int bits, const uint16_t *S, const prep_t *const *ps, float *const *ys,
                               int64_t r0, const int R, const int M, int64_t n, int blocks) {
    int64_t n32 = (n + GROUP - 1) / GROUP * GROUP, ng = n32 / GROUP, nb = blocks ? n / RK_BLOCK : 0;
    const __m256i in_order = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[RK_TILE][RK_TILE];
    RK_TILE_ZERO(acc, _mm256_setzero_ps());
    for (int64_t b = 0; b < nb; b++) {  /* in a full block, lane k of either 32-byte half sums group k */
        __m256i d[RK_TILE][RK_TILE];
        for (int j = 0; j < M; j++) {  /* int4's +8 offset of q: lanes k and k + 8 each hold -4 times group k's sum of x */
            const __m256i *off = (const __m256i *)(ps[j]->boff + b * 16);
            __m256i offset = bits == 8 ? _mm256_setzero_si256() : _mm256_add_epi32(_mm256_loadu_si256(off), _mm256_loadu_si256(off + 1));
            for (int i = 0; i < R; i++) d[i][j] = offset;
        }
        for (int64_t c = b * RK_BLOCK; c < (b + 1) * RK_BLOCK; c += 64)
            for (int i = 0; i < R; i++) {
                __m256i q0, q1;
                weights64(W, bits, r0 + i, n32, n, c, &q0, &q1);
                for (int j = 0; j < M; j++)
                    d[i][j] = _mm256_add_epi32(d[i][j], _mm256_add_epi32(dot_q(bits, q0, ps[j]->x8 + c),
                                                                         dot_q(bits, q1, ps[j]->x8 + c + 32)));
            }
        for (int i = 0; i < R; i++) {
            __m256 s = scales8(S + (r0 + i) * ng + b * 8, in_order);
            for (int j = 0; j < M; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][j]), _mm256_mul_ps(s, _mm256_loadu_ps(ps[j]->bxs + b * 16)),
                                            acc[i][j]);
        }
    }
    for (int64_t c = nb * RK_BLOCK; c < n32; c += 64) {  /* past the blocks: 64 inputs are groups g and g + 1 */
        int64_t g = c / GROUP;
        for (int i = 0; i < R; i++) {
            __m256i q[2];
            weights64(W, bits, r0 + i, n32, n, c, &q[0], &q[1]);
            for (int j = 0; j < M; j++) {
                const prep_t *p = ps[j];
                for (int half = 0; half < 2 && g + half < ng; half++) {
                    __m256i dd = dot_q(bits, q[half], p->x8 + c + 32 * half);
                    if (bits == 4) dd = _mm256_add_epi32(dd, _mm256_loadu_si256((const __m256i *)(p->xnl + c / 4 + 8 * half)));
                    __m256 s = _mm256_set1_ps(half_to_f32(S[(r0 + i) * ng + g + half]) * p->xsl[c / 4 + 8 * half]);
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dd), s, acc[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < R; i++) for (int j = 0; j < M; j++) ys[j][r0 + i] = hsum8(acc[i][j]);
}
#endif

#ifdef RK_SIMD
/* rows r0 .. r0 + R (R <= 4) of a job for M (<= 4) vectors; 0 when this kind has no tile here */
static int rows_tile(const job_t *jb, const prep_t *const *ps, float *const *ys, int64_t r0, int R, int M) {
    int kind = (int)(jb->flags & 15);
    int64_t n = jb->n_in;
    const uint16_t *S = (const uint16_t *)jb->scale;
    int blocks = (jb->flags & RK_BLOCKS) != 0;
    (void)S; (void)blocks;
#ifdef RK_AVX512
    if (kind == K_F32) {
#define RK_F32(r_, m_) tile_f32(jb->w, 0, ps, ys, r0, r_, m_, n)
        RK_SPECIALIZE(RK_F32)
#undef RK_F32
        return 1;
    }
    if (kind == K_BF16_WIDE) {
#define RK_BF16_WIDE(r_, m_) tile_f32(jb->w, 1, ps, ys, r0, r_, m_, n)
        RK_SPECIALIZE(RK_BF16_WIDE)
#undef RK_BF16_WIDE
        return 1;
    }
#ifdef __AVX512BF16__
    if (kind == K_BF16) {
        const uint16_t *W = (const uint16_t *)jb->w;
#define RK_BF16(r_, m_) tile_bf16(W, ps, ys, r0, r_, m_, n)
        RK_SPECIALIZE(RK_BF16)
#undef RK_BF16
        return 1;
    }
#endif
#ifdef __AVX512VNNI__
    if (kind == K_I8 && (jb->flags & RK_ACT8)) {
#define RK_I8A8(r_, m_) tile_q8(jb->w, 8, S, ps, ys, r0, r_, m_, n, blocks)
        RK_SPECIALIZE(RK_I8A8)
#undef RK_I8A8
        return 1;
    }
    if (kind == K_I8) {
        const int8_t *W = (const int8_t *)jb->w;
        const float *corr = (const float *)(intptr_t)jb->tag;
#define RK_I8(r_, m_) tile_i8(W, S, corr, ps, ys, r0, r_, m_, n, blocks)
        RK_SPECIALIZE(RK_I8)
#undef RK_I8
        return 1;
    }
    if (kind == K_I4) {
        const uint8_t *W = (const uint8_t *)jb->w;
#define RK_I4(r_, m_) tile_q8(W, 4, S, ps, ys, r0, r_, m_, n, blocks)
        RK_SPECIALIZE(RK_I4)
#undef RK_I4
        return 1;
    }
#endif
#endif
#ifdef RK_AVX2  /* what the 16-lane tiles above did not take */
    if (kind == K_F32 || kind == K_BF16_WIDE || kind == K_BF16) {
        int wbf = kind != K_F32, xbf = kind == K_BF16;
#define RK_F32_8(r_, m_) tile8_f32(jb->w, wbf, xbf, ps, ys, r0, r_, m_, n)
        RK_SPECIALIZE(RK_F32_8)
#undef RK_F32_8
        return 1;
    }
    if (kind == K_I8 && (jb->flags & RK_ACT8)) {
#define RK_I8A8_8(r_, m_) tile8_q8(jb->w, 8, S, ps, ys, r0, r_, m_, n, blocks)
        RK_SPECIALIZE(RK_I8A8_8)
#undef RK_I8A8_8
        return 1;
    }
    if (kind == K_I8) {
#define RK_I8_8(r_, m_) tile8_i8((const int8_t *)jb->w, S, ps, ys, r0, r_, m_, n, blocks)
        RK_SPECIALIZE(RK_I8_8)
#undef RK_I8_8
        return 1;
    }
    if (kind == K_I4) {
#define RK_I4_8(r_, m_) tile8_q8(jb->w, 4, S, ps, ys, r0, r_, m_, n, blocks)
        RK_SPECIALIZE(RK_I4_8)
#undef RK_I4_8
        return 1;
    }
#endif
    return 0;
}
#endif

/* ------------------------------------------- cols layout: y[o] = sum over nonzero j of x[j] W[j,o] */

/* fp32 / bf16 cols layout, a block of nonzero inputs [q0, q1): part = sum of x[j] W[j, :] over them.
   Four rows at a time, each read front to back (the partial sums stay in L1): the rows stream like
   the rows layout's, where a walk over output tiles would jump between rows. */
static void cols_block(int kind, const void *Wv, const float *xf, const int32_t *nz, int64_t q0, int64_t q1,
                       float *part, int64_t n_out) {
    for (int64_t o = 0; o < n_out; o++) part[o] = 0.f;
    int64_t q = q0;
#ifdef RK_AVX512
    for (; q + 4 <= q1; q += 4) {
        __m512 x0 = _mm512_set1_ps(xf[nz[q]]), x1 = _mm512_set1_ps(xf[nz[q + 1]]);
        __m512 x2 = _mm512_set1_ps(xf[nz[q + 2]]), x3 = _mm512_set1_ps(xf[nz[q + 3]]);
        for (int64_t o = 0; o < n_out; o += 16) {
            __mmask16 m = n_out - o >= 16 ? 0xffff : (__mmask16)((1u << (n_out - o)) - 1);
            __m512 acc = _mm512_maskz_loadu_ps(m, part + o), w0, w1, w2, w3;
            if (kind == K_BF16) {
                const uint16_t *W = (const uint16_t *)Wv;
#define RK_BF16_ROW(i) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32( \
                    _mm256_maskz_loadu_epi16(m, W + (int64_t)nz[q + i] * n_out + o)), 16))
                w0 = RK_BF16_ROW(0); w1 = RK_BF16_ROW(1); w2 = RK_BF16_ROW(2); w3 = RK_BF16_ROW(3);
#undef RK_BF16_ROW
            } else {
                const float *W = (const float *)Wv;
                w0 = _mm512_maskz_loadu_ps(m, W + (int64_t)nz[q] * n_out + o);
                w1 = _mm512_maskz_loadu_ps(m, W + (int64_t)nz[q + 1] * n_out + o);
                w2 = _mm512_maskz_loadu_ps(m, W + (int64_t)nz[q + 2] * n_out + o);
                w3 = _mm512_maskz_loadu_ps(m, W + (int64_t)nz[q + 3] * n_out + o);
            }
            acc = _mm512_fmadd_ps(w0, x0, _mm512_fmadd_ps(w1, x1, acc));
            acc = _mm512_fmadd_ps(w2, x2, _mm512_fmadd_ps(w3, x3, acc));
            _mm512_mask_storeu_ps(part + o, m, acc);
        }
    }
#endif
    for (; q < q1; q++) {
        int32_t j = nz[q]; float xj = xf[j];
        if (kind == K_BF16) {
            const uint16_t *row = (const uint16_t *)Wv + (int64_t)j * n_out;
            for (int64_t o = 0; o < n_out; o++) part[o] += xj * bf16_to_f32(row[o]);
        } else {
            const float *row = (const float *)Wv + (int64_t)j * n_out;
            for (int64_t o = 0; o < n_out; o++) part[o] += xj * row[o];
        }
    }
}

/* ---------------------------------------------------------------- driver
   A job multiplies its weight with M vectors (flags bits 32-47, 0 meaning 1): x [M, n_in] and
   y [M, n_out]. Each vector is prepared on its own (rounded to what the weight format multiplies
   with) and every output is computed by the same row function as for a single vector, so a row of
   a batch is bitwise the row computed alone. Rows layout: a work unit is a block of weight rows,
   taken a few at a time for every vector while they sit in L1, so a batch reads the weights from
   memory once. Cols layout: a unit is a block of one vector's nonzero inputs. */

static inline int64_t job_vectors(const job_t *jb) {
    int64_t m = (jb->flags >> 32) & 0xffff;
    return m ? m : 1;
}

static int64_t row_bytes(int kind, int64_t n) {
    int64_t b = kind == K_I4 ? n / 2 : n * (kind == K_F32 ? 4 : kind == K_BF16 || kind == K_BF16_WIDE ? 2 : 1);
    return b > 0 ? b : 1;
}

static int all_finite(const float *x, int64_t n) {
    int64_t c = 0;
#ifdef RK_AVX512
    __mmask16 bad = 0;
    for (; c + 16 <= n; c += 16) bad |= _mm512_fpclass_ps_mask(_mm512_loadu_ps(x + c), 0x99);  /* NaN, +-inf */
    if (bad) return 0;
#endif
    for (; c < n; c++)
        if (!isfinite(x[c])) return 0;
    return 1;
}

static float abs_max(const float *x, int64_t n) {
    float m = 0.f;
    int64_t c = 0;
#ifdef RK_AVX512
    __m512 v = _mm512_setzero_ps();
    for (; c + 16 <= n; c += 16) v = _mm512_max_ps(v, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
    m = _mm512_reduce_max_ps(v);
#endif
    for (; c < n; c++) { float a = fabsf(x[c]); m = a > m ? a : m; }
    return m;
}

/* Memory a call needs again on every token: the calling thread's buffer, grown when a call needs
   more and then kept, so a decode step neither mallocs nor faults in fresh pages. */
typedef struct { char *p; size_t size; } scratch_t;
static __thread scratch_t gemv_scratch, layer_scratch, tail_scratch;

static void *scratch_buffer(scratch_t *s, size_t bytes) {
    if (bytes > s->size) {
        free(s->p);
        s->size = bytes + bytes / 2;
        s->p = (char *)malloc(s->size);
    }
    return s->p;
}

/* the next `bytes` of a vector's region, 64-byte aligned */
static void *take(char **at, size_t bytes) {
    char *p = (char *)(((uintptr_t)*at + 63) & ~(uintptr_t)63);
    *at = p + bytes;
    return p;
}

/* the most prep_vector takes from its region for one vector of the job */
static size_t prep_bytes(const job_t *jb) {
    int64_t n = jb->n_in, kind = jb->flags & 15, n32 = (n + GROUP - 1) / GROUP * GROUP;
    size_t bytes = 16 * 64 + 4 * n;  /* alignment, xf */
    if ((jb->flags >> 4) & 1) return bytes + 4 * (n + 4) + 4 * jb->n_out * 8;
    if (kind == K_I4 || (jb->flags & RK_ACT8)) return bytes + n32 + 64 + 16 * (n32 / 4 + 16) + 8 * (n / RK_BLOCK * 16 + 1);
    if (kind == K_I8) return bytes + 4 * n + 2 * n32;
    return bytes + (kind == K_BF16 ? 2 * n : 0);
}

/* a group of `len` (<= 32) values rounded to int8, round(x * 127 / m) with m the largest |x|
   (lrintf's rounding), zero-padded to 32; *scale = m / 127; returns the sum of the 32 */
static int32_t group_to_int8(const float *x, int64_t len, int8_t *q, float *scale) {
#ifdef RK_AVX512
    __mmask16 m0 = len >= 16 ? 0xffff : (__mmask16)((1u << len) - 1);
    __mmask16 m1 = len >= 32 ? 0xffff : len > 16 ? (__mmask16)((1u << (len - 16)) - 1) : 0;
    __m512 v0 = _mm512_maskz_loadu_ps(m0, x), v1 = _mm512_maskz_loadu_ps(m1, x + 16);
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    __m512 inv = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
    *scale = m / 127.f;
    return _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
    float m = 0.f;
    for (int64_t c = 0; c < len; c++) { float a = fabsf(x[c]); m = a > m ? a : m; }
    float inv = m > 0.f ? 127.f / m : 0.f;
    int32_t sum = 0;
    for (int64_t c = 0; c < GROUP; c++) {
        q[c] = c < len ? (int8_t)lrintf(x[c] * inv) : 0;
        sum += q[c];
    }
    *scale = m / 127.f;
    return sum;
#endif
}

/* one vector of a job: its copies and roundings, in `mem` (prep_bytes of it); p->bad when it has
   a NaN or an infinity */
static void prep_vector(const job_t *jb, const void *x, prep_t *p, char *mem) {
    int64_t n = jb->n_in, kind = jb->flags & 15, cols = (jb->flags >> 4) & 1;
    memset(p, 0, sizeof(*p));
    p->xf = (float *)take(&mem, sizeof(float) * n);
    if (jb->flags & 256) { const uint16_t *xb = (const uint16_t *)x; for (int64_t c = 0; c < n; c++) p->xf[c] = bf16_to_f32(xb[c]); }
    else memcpy(p->xf, x, sizeof(float) * n);
    if (!all_finite(p->xf, n)) { p->bad = 1; return; }
    if (cols) {
        p->nz = (int32_t *)take(&mem, sizeof(int32_t) * (n + 4));
        for (int64_t c = 0; c < n; c++)
            if (p->xf[c] != 0.f) p->nz[p->n_nz++] = (int32_t)c;
        /* blocks of nonzero inputs, each into its own partial sums (summed after the run) */
        int64_t units = (p->n_nz + 31) / 32;
        units = units > 8 ? 8 : units;
        p->rows_per_unit = units ? (p->n_nz + units - 1) / units : 1;
        p->units = units;
        p->part = (float *)take(&mem, sizeof(float) * jb->n_out * (units ? units : 1));
    } else if (kind == K_I8 && !(jb->flags & RK_ACT8)) {  /* xq in input order; its bytes lo and hi in the weights' storage order */
        int blocks = (jb->flags & RK_BLOCKS) != 0;
        float m = abs_max(p->xf, n);
        p->xq = (int16_t *)take(&mem, sizeof(int16_t) * n);
        p->xs = m > 0.f ? m / 32767.f : 1.f;
        float inv = 1.f / p->xs;
        p->xlo = (uint8_t *)take(&mem, n); p->xhi = (uint8_t *)take(&mem, n);
        int64_t c = 0;
#ifdef RK_AVX512
        /* 16 inputs at a time (lrintf's rounding: the default round-to-nearest-even); in a full
           block their 4 dwords of lo / hi bytes go to their lanes (stored_index) */
        int64_t full = blocks ? n / RK_BLOCK * RK_BLOCK : 0;
        for (; c + 16 <= n; c += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p->xf + c), _mm512_set1_ps(inv)));
            q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-32767)), _mm512_set1_epi32(32767));
            _mm256_storeu_si256((__m256i *)(p->xq + c), _mm512_cvtepi32_epi16(q));
            __m128i lo = _mm512_cvtepi32_epi8(q), hi = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_srai_epi32(q, 8), _mm512_set1_epi32(128)));
            if (c < full) {
                uint32_t l4[4], h4[4];
                _mm_storeu_si128((__m128i *)l4, lo); _mm_storeu_si128((__m128i *)h4, hi);
                for (int d = 0; d < 4; d++) {
                    int64_t at = stored_index(c + 4 * d, n, 1);
                    memcpy(p->xlo + at, &l4[d], 4); memcpy(p->xhi + at, &h4[d], 4);
                }
            } else {
                _mm_storeu_si128((__m128i *)(p->xlo + c), lo); _mm_storeu_si128((__m128i *)(p->xhi + c), hi);
            }
        }
#endif
        for (; c < n; c++) {
            int32_t q = (int32_t)lrintf(p->xf[c] * inv);
            q = q > 32767 ? 32767 : (q < -32767 ? -32767 : q);
            int64_t at = stored_index(c, n, blocks);
            p->xq[c] = (int16_t)q; p->xlo[at] = (uint8_t)(q & 255); p->xhi[at] = (uint8_t)((q >> 8) + 128);
        }
#ifdef RK_I8_MADD
        size_t padded = (size_t)((n + GROUP - 1) / GROUP * GROUP) * sizeof(int16_t);
        p->xqs = (int16_t *)memset(take(&mem, padded), 0, padded);
        for (int64_t k = 0; k < n; k++) p->xqs[stored_index(k, n, blocks)] = p->xq[k];
#endif
    } else if (kind == K_I4 || kind == K_I8) {  /* x8 in the weights' storage order */
        int blocks = (jb->flags & RK_BLOCKS) != 0;
        int32_t offset = kind == K_I4 ? 8 : 128;  /* what the VNNI tiles add to q: q + 8, or q ^ 0x80 */
        int64_t n32 = (n + GROUP - 1) / GROUP * GROUP, nb = blocks ? n / RK_BLOCK : 0;
        size_t lanes = sizeof(float) * ((size_t)n32 / 4 + 16);
        p->x8 = (int8_t *)memset(take(&mem, (size_t)n32 + 64), 0, (size_t)n32 + 64);
        p->xsl = (float *)memset(take(&mem, lanes), 0, lanes);
        p->xnl = (int32_t *)memset(take(&mem, lanes), 0, lanes);
        p->bxs = (float *)take(&mem, sizeof(float) * (nb * 16 + 1));
        p->boff = (int32_t *)take(&mem, sizeof(int32_t) * (nb * 16 + 1));
        for (int64_t g = 0; g < n32 / GROUP; g++) {
            int64_t c = g * GROUP;
            int8_t q[GROUP];
            float xs;
            int32_t sum = group_to_int8(p->xf + c, n - c < GROUP ? n - c : GROUP, q, &xs);
            if (blocks && c < nb * RK_BLOCK)  /* the group's 8 dwords to their lanes (stored_index) */
                for (int d = 0; d < 8; d++) memcpy(p->x8 + stored_index(c + 4 * d, n, 1), q + 4 * d, 4);
            else memcpy(p->x8 + c, q, GROUP);
            for (int l = 0; l < 8; l++) { p->xsl[g * 8 + l] = xs; p->xnl[g * 8 + l] = -offset / 8 * sum; }
            if (g / 8 < nb)
                for (int half = 0; half < 2; half++) {
                    p->bxs[g / 8 * 16 + half * 8 + g % 8] = xs;
                    p->boff[g / 8 * 16 + half * 8 + g % 8] = -offset / 2 * sum;
                }
        }
    } else if (kind == K_BF16) {
        p->xb = (uint16_t *)take(&mem, sizeof(uint16_t) * n);
        for (int64_t c = 0; c < n; c++) p->xb[c] = f32_to_bf16(p->xf[c]);
    }
}

typedef struct {
    const job_t *jb;
    prep_t *prep;        /* one per vector */
    char *mem;           /* the vectors' prep_vector regions, `stride` bytes each */
    size_t stride;
    float *y;            /* fp32 outputs [M, n_out] (y itself, or a buffer when y is bf16) */
    int64_t M, units, rows_per_unit;
} job_run_t;

static void run_unit(const job_run_t *j, int64_t u) {
    const job_t *jb = j->jb;
    int64_t n_out = jb->n_out;
    if ((jb->flags >> 4) & 1) {  /* cols: find the vector whose unit this is */
        int64_t m = 0;
        while (u >= j->prep[m].units) u -= j->prep[m].units, m++;
        const prep_t *p = &j->prep[m];
        int64_t q0 = u * p->rows_per_unit, q1 = q0 + p->rows_per_unit < p->n_nz ? q0 + p->rows_per_unit : p->n_nz;
        cols_block((int)(jb->flags & 15), jb->w, p->xf, p->nz, q0, q1, p->part + u * n_out, n_out);
        return;
    }
    int64_t r0 = u * j->rows_per_unit, r1 = r0 + j->rows_per_unit < n_out ? r0 + j->rows_per_unit : n_out;
    const prep_t *ps[16];
    float *ys[16];
    int64_t m = 0;
    while (m < j->M) {  /* up to 16 good vectors at a time: their rows stay in L1 between tiles */
        int count = 0;
        for (; m < j->M && count < 16; m++)
            if (!j->prep[m].bad) { ps[count] = &j->prep[m]; ys[count] = j->y + m * n_out; count++; }
#ifdef RK_SIMD
        /* a few vectors: a row at a time, streamed in order; more: tiles of 4 rows (2 for int8 /
           int4, whose tiles hold two int32 accumulators per pair). The 8-lane tiles take a row at a
           time for up to 4 vectors (2 rows x 4 vectors of floats took 1.1-1.4x as long, measured) */
#ifdef RK_AVX512
        int kind = (int)(jb->flags & 15), quant = kind == K_I8 || kind == K_I4;
        int rows = count == 1 || (quant && count <= RK_TILE) ? 1 : (quant ? 2 : RK_TILE);
#else
        int rows = 1;
#endif
        for (int64_t a = r0; a < r1; a += rows) {
            int R = r1 - a < rows ? (int)(r1 - a) : rows;
            for (int t = 0; t < count; t += RK_TILE)
                if (!rows_tile(jb, ps + t, ys + t, a, R, count - t < RK_TILE ? count - t : RK_TILE))
                    for (int v = t; v < count && v < t + RK_TILE; v++) rows_portable(jb, ps[v], ys[v], a, a + R);
        }
#else
        for (int v = 0; v < count; v++) rows_portable(jb, ps[v], ys[v], r0, r1);
#endif
    }
}

typedef struct { job_run_t *runs; int n_jobs; int64_t first[17], vectors; } gemv_ctx_t;
typedef struct { job_run_t *runs; int n_jobs; } prep_ctx_t;

static void prep_unit(void *arg, int64_t u) {
    prep_ctx_t *c = (prep_ctx_t *)arg;
    int i = 0;
    while (u >= c->runs[i].M) u -= c->runs[i].M, i++;
    const job_t *jb = c->runs[i].jb;
    prep_vector(jb, (const char *)jb->x + u * jb->n_in * ((jb->flags & 256) ? 2 : 4), &c->runs[i].prep[u],
                c->runs[i].mem + u * c->runs[i].stride);
}

static void gemv_unit(void *arg, int64_t u) {
    gemv_ctx_t *c = (gemv_ctx_t *)arg;
    int i = 0;
    while (u >= c->first[i + 1]) i++;
    run_unit(&c->runs[i], u - c->first[i]);
}

int rk_gemv(int n_jobs, const job_t *jobs, int n_threads) {
    job_run_t runs[16];
    if (n_jobs > 16) return -1;
    gemv_ctx_t ctx = { runs, n_jobs, {0}, 0 };
    size_t bytes = 0;
    for (int i = 0; i < n_jobs; i++) {
        const job_t *jb = &jobs[i];
        int64_t M = job_vectors(jb);
        runs[i].stride = (prep_bytes(jb) + 63) / 64 * 64;
        bytes += 3 * 64 + M * (sizeof(prep_t) + runs[i].stride + ((jb->flags & 512) ? sizeof(float) * jb->n_out : 0));  /* 3 aligned takes */
    }
    char *at = (char *)scratch_buffer(&gemv_scratch, bytes);
    for (int i = 0; i < n_jobs; i++) {
        const job_t *jb = &jobs[i];
        job_run_t *j = &runs[i];
        j->jb = jb; j->M = job_vectors(jb);
        j->mem = (char *)take(&at, j->M * j->stride);
        j->prep = (prep_t *)take(&at, sizeof(prep_t) * j->M);
        j->y = (jb->flags & 512) ? (float *)take(&at, sizeof(float) * jb->n_out * j->M) : (float *)jb->y;
        j->units = 0;
        ctx.vectors += j->M;
    }
    /* the vectors' preparation: in parallel for a batch */
    prep_ctx_t pc = { runs, n_jobs };
    pool_run(prep_unit, &pc, ctx.vectors, ctx.vectors >= 4 ? n_threads : 1);
    for (int i = 0; i < n_jobs; i++) {
        const job_t *jb = &jobs[i];
        job_run_t *j = &runs[i];
        int64_t n_out = jb->n_out, n_in = jb->n_in;
        for (int64_t m = 0; m < j->M; m++) {
            prep_t *p = &j->prep[m];
            if (p->bad) {  /* a diverged activation: every output is NaN, as a float product would make it */
                for (int64_t o = 0; o < n_out; o++) j->y[m * n_out + o] = NAN;
            } else if ((jb->flags >> 4) & 1) j->units += p->units;
        }
        if (!((jb->flags >> 4) & 1)) {
            int64_t rpu = (64 * 1024) / row_bytes((int)(jb->flags & 15), n_in);
            j->rows_per_unit = rpu < 4 ? 4 : (rpu / 4) * 4;
            j->units = (n_out + j->rows_per_unit - 1) / j->rows_per_unit;
        }
        ctx.first[i + 1] = ctx.first[i] + j->units;
    }
    pool_run(gemv_unit, &ctx, ctx.first[n_jobs], n_threads);
    for (int i = 0; i < n_jobs; i++) {
        job_run_t *j = &runs[i];
        int64_t n_out = j->jb->n_out;
        for (int64_t m = 0; m < j->M; m++) {
            prep_t *p = &j->prep[m];
            if (p->part) {
                float *y = j->y + m * n_out;
                for (int64_t o = 0; o < n_out; o++) y[o] = 0.f;
                for (int64_t u = 0; u < p->units; u++) {
                    const float *part = p->part + u * n_out;
                    for (int64_t o = 0; o < n_out; o++) y[o] += part[o];
                }
            }
        }
        if (j->jb->flags & 512) {
            uint16_t *yb = (uint16_t *)j->jb->y;
            for (int64_t o = 0; o < n_out * j->M; o++) yb[o] = f32_to_bf16(j->y[o]);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- dequantize (prefill)
   Rows r0..r1 of a group-wise int8/int4 weight as fp32 or bf16 [rows, n], for torch's GEMMs. */
typedef struct { int bits, blocks; int64_t r0, n; const void *q; const uint16_t *scale; void *out; int out_bf16; } deq_ctx_t;

/* one row's q values (q + 8 for int4) in input order, as int8 [n32] */
static void row_values(const deq_ctx_t *c, int64_t r, int8_t *v) {
    int64_t n = c->n, ng = (n + GROUP - 1) / GROUP, n32 = ng * GROUP, nb = c->blocks ? n / RK_BLOCK : 0;
    int8_t chunk[64];
    if (c->bits == 8) {
        const int8_t *q = (const int8_t *)c->q + r * n;
        memcpy(v + nb * RK_BLOCK, q + nb * RK_BLOCK, (size_t)(n - nb * RK_BLOCK));
        memset(v + n, 0, (size_t)(n32 - n));
    } else {
        const uint8_t *q = (const uint8_t *)c->q + r * (n32 / 2);
        for (int64_t k = nb * RK_BLOCK; k < n32; k++) v[k] = (int8_t)(nibble(q, k, n32) + 8);
    }
    for (int64_t b = 0; b < nb; b++)  /* a block: lane l of chunk j holds inputs 8j + 4 (l / 8) .. + 3 of group l % 8 */
        for (int j = 0; j < 4; j++) {
            int64_t at = b * RK_BLOCK + j * 64;
            const int8_t *src;
            if (c->bits == 8) src = (const int8_t *)c->q + r * n + at;
            else {
                const uint8_t *q = (const uint8_t *)c->q + r * (n32 / 2) + at / 2;
                for (int i = 0; i < 32; i++) { chunk[i] = (int8_t)(q[i] & 15); chunk[i + 32] = (int8_t)(q[i] >> 4); }
                src = chunk;
            }
            for (int l = 0; l < 16; l++) memcpy(v + b * RK_BLOCK + (l % 8) * GROUP + j * 8 + (l / 8) * 4, src + l * 4, 4);
        }
}

static void deq_unit(void *arg, int64_t u) {
    const deq_ctx_t *c = (const deq_ctx_t *)arg;
    int64_t n = c->n, ng = (n + GROUP - 1) / GROUP, r = c->r0 + u;
    const uint16_t *s = c->scale + r * ng;
    int8_t values[ng * GROUP];
    row_values(c, r, values);
    int offset = c->bits == 8 ? 0 : 8;
    for (int64_t g = 0; g < ng; g++) {
        int64_t k0 = g * GROUP, width = n - k0 < GROUP ? n - k0 : GROUP;
        float sc = half_to_f32(s[g]);
        float buf[GROUP];
        int64_t i = 0;
#ifdef RK_AVX512
        for (; i + 16 <= width; i += 16) {
            __m512i q = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(values + k0 + i))),
                                         _mm512_set1_epi32(offset));
            _mm512_storeu_ps(buf + i, _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sc)));
        }
#endif
        for (; i < width; i++) buf[i] = (float)(values[k0 + i] - offset) * sc;
        if (c->out_bf16) {
            uint16_t *o = (uint16_t *)c->out + u * n + k0;
            i = 0;
#if defined(RK_AVX512) && defined(__AVX512BF16__)
            for (; i + 16 <= width; i += 16) _mm256_storeu_si256((__m256i *)(o + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(buf + i)));
#endif
            for (; i < width; i++) o[i] = f32_to_bf16(buf[i]);
        } else memcpy((float *)c->out + u * n + k0, buf, sizeof(float) * width);
    }
}

/* bits: 8 or 4, plus RK_BLOCKS when q is stored in blocks */
void rk_dequant_groups(int bits, int64_t r0, int64_t r1, int64_t n, const void *q, const void *scale, void *out,
                       int out_bf16, int n_threads) {
    deq_ctx_t ctx = { bits & 15, (bits & RK_BLOCKS) != 0, r0, n, q, (const uint16_t *)scale, out, out_bf16 };
    pool_run(deq_unit, &ctx, r1 - r0, (r1 - r0) * n >= 65536 ? n_threads : 1);
}


/* ---------------------------------------------------------------- bf16 GEMM (prefill)
   y[T, N] (fp32, rows ldy apart) = x[T, K] (fp32, rounded to bf16 here) times W[N, K]^T (bf16):
   llama.cpp's BF16 arithmetic, products of bf16 values summed in fp32, results kept fp32. Work
   units are blocks of GEMM_TOKENS tokens x GEMM_ROWS rows; inside one, tiles of 4 rows x up to 6
   tokens (24 accumulators), so each weight chunk is loaded once for 6 tokens. */
#define GEMM_TOKENS 48
#define GEMM_ROWS 64
typedef struct {
    int64_t T, N, K, Kp, ldy, row_blocks; const uint16_t *w; const uint16_t *xb; float *y; const float *x; uint16_t *xout;
    _Atomic int failed;  /* a unit could not allocate its panel */
} gemm_ctx_t;

static void gemm_round_unit(void *arg, int64_t t) {  /* token t of x to bf16, zero-padded to Kp */
    const gemm_ctx_t *c = (const gemm_ctx_t *)arg;
    const float *x = c->x + t * c->K;
    uint16_t *o = c->xout + t * c->Kp;
    int64_t k = 0;
#if defined(RK_AVX512) && defined(__AVX512BF16__)
    for (; k + 16 <= c->K; k += 16) _mm256_storeu_si256((__m256i *)(o + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + k)));
#endif
    for (; k < c->K; k++) o[k] = f32_to_bf16(x[k]);
    for (; k < c->Kp; k++) o[k] = 0;
}

#if defined(RK_AVX512) && defined(__AVX512BF16__)
/* 4 accumulators -> their 4 sums */

/* rows r0..r0+R-1 (R <= 4) times tokens t0..t0+V-1 (V <= 6) */
RK_ALWAYS_INLINE void gemm_tile(const gemm_ctx_t *c, int64_t r0, int64_t t0, const int R, const int V) {
    int64_t K = c->K, full = K / 32 * 32;
    __m512 acc[4][6];
    for (int i = 0; i < 4; i++) for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_ps();
    const uint16_t *W = c->w + r0 * K, *X = c->xb + t0 * c->Kp;
    for (int64_t k = 0; k < c->Kp; k += 32) {
        __mmask32 mk = k < full ? 0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
        __m512i w[4];
        for (int i = 0; i < R; i++) w[i] = _mm512_maskz_loadu_epi16(mk, W + i * K + k);
        for (int j = 0; j < V; j++) {
            __m512i x = _mm512_loadu_si512((const void *)(X + j * c->Kp + k));
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)w[i], (__m512bh)x);
        }
    }
    for (int j = 0; j < V; j++) {
        float *y = c->y + (t0 + j) * c->ldy + r0;
        __m128 s = sum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
        if (R == 4) _mm_storeu_ps(y, s);
        else _mm_mask_storeu_ps(y, (__mmask8)((1u << R) - 1), s);
    }
}
#define RK_GEMM_V(R_) switch (V) { case 1: gemm_tile(c, r, t, R_, 1); break; case 2: gemm_tile(c, r, t, R_, 2); break; \
    case 3: gemm_tile(c, r, t, R_, 3); break; case 4: gemm_tile(c, r, t, R_, 4); break; \
    case 5: gemm_tile(c, r, t, R_, 5); break; default: gemm_tile(c, r, t, R_, 6); break; }
#endif

/* The cols layout (W stored [K, N]): a unit takes GEMM_COLS outputs for all tokens. It first packs
   their weights as pairs of inputs ([K / 2][GEMM_COLS][2], zero-padded), the operand layout of
   the bf16 dot instruction; then tiles of 6 tokens x 64 outputs, each token's input pair
   broadcast: 24 accumulators, nothing to reduce. */
#define GEMM_COLS 64
static void gemm_cols_unit(void *arg, int64_t u) {
    const gemm_ctx_t *c = (const gemm_ctx_t *)arg;
    int64_t n0 = u * GEMM_COLS, width = c->N - n0 < GEMM_COLS ? c->N - n0 : GEMM_COLS, pairs = c->Kp / 2;
    uint32_t *panel = (uint32_t *)aligned_alloc(64, (size_t)pairs * GEMM_COLS * 4);
    if (!panel) { atomic_store(&((gemm_ctx_t *)arg)->failed, 1); return; }
    for (int64_t p = 0; p < pairs; p++) {
        const uint16_t *a = 2 * p < c->K ? c->w + 2 * p * c->N + n0 : NULL, *b = 2 * p + 1 < c->K ? a + c->N : NULL;
        uint32_t *out = panel + p * GEMM_COLS;
        int64_t i = 0;
#ifdef RK_AVX512
        for (; a && b && i + 16 <= width; i += 16) {
            __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + i)));
            __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + i)));
            _mm512_store_si512((void *)(out + i), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
#endif
        for (; i < GEMM_COLS; i++)
            out[i] = a && i < width ? (uint32_t)a[i] | (b ? (uint32_t)b[i] << 16 : 0u) : 0u;
    }
    for (int64_t t = 0; t < c->T; t += 6) {
        int V = c->T - t < 6 ? (int)(c->T - t) : 6;
#if defined(RK_AVX512) && defined(__AVX512BF16__)
        __m512 acc[6][4];
        for (int j = 0; j < 6; j++) for (int q = 0; q < 4; q++) acc[j][q] = _mm512_setzero_ps();
        const uint32_t *X = (const uint32_t *)(c->xb + t * c->Kp);
        for (int64_t p = 0; p < pairs; p++) {
            __m512i w[4];
            for (int q = 0; q < 4; q++) w[q] = _mm512_load_si512((const void *)(panel + p * GEMM_COLS + q * 16));
            for (int j = 0; j < V; j++) {
                __m512i x = _mm512_castps_si512(_mm512_broadcastss_ps(_mm_load_ss((const float *)(X + j * (c->Kp / 2) + p))));
                for (int q = 0; q < 4; q++) acc[j][q] = _mm512_dpbf16_ps(acc[j][q], (__m512bh)w[q], (__m512bh)x);
            }
        }
        for (int j = 0; j < V; j++)
            for (int q = 0; q < 4 && q * 16 < width; q++) {
                int64_t left = width - q * 16;
                _mm512_mask_storeu_ps(c->y + (t + j) * c->ldy + n0 + q * 16, left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1), acc[j][q]);
            }
#else
        for (int j = 0; j < V; j++)
            for (int64_t i = 0; i < width; i++) {
                float s = 0.f;
                for (int64_t p = 0; p < pairs; p++) {
                    uint32_t wp = panel[p * GEMM_COLS + i];
                    s += bf16_to_f32((uint16_t)wp) * bf16_to_f32(c->xb[(t + j) * c->Kp + 2 * p])
                       + bf16_to_f32((uint16_t)(wp >> 16)) * bf16_to_f32(c->xb[(t + j) * c->Kp + 2 * p + 1]);
                }
                c->y[(t + j) * c->ldy + n0 + i] = s;
            }
#endif
    }
    free(panel);
}

static void gemm_unit(void *arg, int64_t u) {
    const gemm_ctx_t *c = (const gemm_ctx_t *)arg;
    int64_t ta = u / c->row_blocks * GEMM_TOKENS, ra = u % c->row_blocks * GEMM_ROWS;
    int64_t tb = ta + GEMM_TOKENS < c->T ? ta + GEMM_TOKENS : c->T, rb = ra + GEMM_ROWS < c->N ? ra + GEMM_ROWS : c->N;
    for (int64_t r = ra; r < rb; r += 4)
        for (int64_t t = ta; t < tb; t += 6) {
#if defined(RK_AVX512) && defined(__AVX512BF16__)
            int R = rb - r < 4 ? (int)(rb - r) : 4, V = tb - t < 6 ? (int)(tb - t) : 6;
            if (R == 4) { RK_GEMM_V(4) } else if (R == 3) { RK_GEMM_V(3) } else if (R == 2) { RK_GEMM_V(2) } else { RK_GEMM_V(1) }
#else
            for (int64_t i = r; i < r + 4 && i < rb; i++)
                for (int64_t j = t; j < t + 6 && j < tb; j++) {
                    float s = 0.f;
                    for (int64_t k = 0; k < c->K; k++) s += bf16_to_f32(c->w[i * c->K + k]) * bf16_to_f32(c->xb[j * c->Kp + k]);
                    c->y[j * c->ldy + i] = s;
                }
#endif
        }
}

int rk_gemm_bf16(int64_t T, int64_t N, int64_t K, const float *x, const void *w, float *y, int64_t ldy, int cols,
                 int n_threads) {
    int64_t Kp = (K + 31) / 32 * 32;
    uint16_t *xb = (uint16_t *)aligned_alloc(64, (size_t)(T * Kp * 2 + 64) / 64 * 64);
    if (!xb) return -1;
    gemm_ctx_t c = { T, N, K, Kp, ldy, (N + GEMM_ROWS - 1) / GEMM_ROWS, (const uint16_t *)w, xb, y, x, xb, 0 };
    pool_run(gemm_round_unit, &c, T, T * K >= 65536 ? n_threads : 1);
    if (cols) pool_run(gemm_cols_unit, &c, (N + GEMM_COLS - 1) / GEMM_COLS, n_threads);
    else pool_run(gemm_unit, &c, (T + GEMM_TOKENS - 1) / GEMM_TOKENS * c.row_blocks, n_threads);
    free(xb);
    return atomic_load(&c.failed) ? -1 : 0;
}

int rk_simd(void) {
#if defined(RK_AVX512)
    return 2;
#elif defined(RK_AVX2)
    return 1;
#else
    return 0;
#endif
}

int rk_gemm_bf16_native(void) {
#if defined(RK_AVX512) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- WKV recurrences */

/* exp for x <= ~88 with relative error ~2e-7; vectorizes (no libm call). */
static inline float rk_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float y = x * 1.44269504088896341f;
    float n = floorf(y + 0.5f);
    float f = y - n;  /* in [-0.5, 0.5] */
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    union { int32_t i; float f; } s; s.i = ((int32_t)n + 127) << 23;
    return p * s.f;
}

/* v4: per channel, numerically safe running sums (aa, bb, pp). k, v, out: [T, C]. */
typedef struct { int64_t T, C; const float *k, *v, *w, *u, *aa_in, *bb_in, *pp_in; float *aa_out, *bb_out, *pp_out, *out; } wkv4_ctx_t;

static void wkv4_unit(void *arg, int64_t b) {
    const wkv4_ctx_t *x = (const wkv4_ctx_t *)arg;
    int64_t T = x->T, C = x->C, c0 = b * 64, c1 = c0 + 64 < C ? c0 + 64 : C;
    const float *w = x->w, *u = x->u;
    float aa[64], bb[64], pp[64];
    for (int64_t c = c0; c < c1; c++) { aa[c - c0] = x->aa_in[c]; bb[c - c0] = x->bb_in[c]; pp[c - c0] = x->pp_in[c]; }
    for (int64_t t = 0; t < T; t++) {
        const float *kt = x->k + t * C, *vt = x->v + t * C; float *ot = x->out + t * C;
        #pragma omp simd
        for (int64_t c = c0; c < c1; c++) {
            int64_t i = c - c0;
            float kk = kt[c], vv = vt[c];
            float ww = u[c] + kk;
            float p = pp[i] > ww ? pp[i] : ww;
            float e1 = rk_exp(pp[i] - p), e2 = rk_exp(ww - p);
            ot[c] = (e1 * aa[i] + e2 * vv) / (e1 * bb[i] + e2);
            ww = w[c] + pp[i];
            p = ww > kk ? ww : kk;
            e1 = rk_exp(ww - p); e2 = rk_exp(kk - p);
            aa[i] = e1 * aa[i] + e2 * vv; bb[i] = e1 * bb[i] + e2; pp[i] = p;
        }
    }
    for (int64_t c = c0; c < c1; c++) { x->aa_out[c] = aa[c - c0]; x->bb_out[c] = bb[c - c0]; x->pp_out[c] = pp[c - c0]; }
}

void rk_wkv4(int64_t T, int64_t C, const float *k, const float *v, const float *w, const float *u,
             const float *aa_in, const float *bb_in, const float *pp_in,
             float *aa_out, float *bb_out, float *pp_out, float *out, int n_threads) {
    wkv4_ctx_t ctx = { T, C, k, v, w, u, aa_in, bb_in, pp_in, aa_out, bb_out, pp_out, out };
    pool_run(wkv4_unit, &ctx, (C + 63) / 64, T * C >= 8192 ? n_threads : 1);
}

/* v5.2 / v6: S [H][K][V]; out_t = r_t (u k_t v_t^T + S); S <- k_t v_t^T + diag(w_t) S.
   r, k, v: [T, H, N]; w: [T, H, N] with T-stride w_tstride (0 for v5.2's constant decay); u: [H, N]. */
typedef struct { int64_t T, H, N; const float *r, *k, *v, *w; int64_t w_tstride; const float *u, *s_in; float *s_out, *out; } wkv5_ctx_t;

static void wkv5_unit(void *arg, int64_t h) {
    const wkv5_ctx_t *x = (const wkv5_ctx_t *)arg;
    int64_t T = x->T, H = x->H, N = x->N;
    float *S = x->s_out + h * N * N;
    memcpy(S, x->s_in + h * N * N, sizeof(float) * N * N);
    const float *uh = x->u + h * N;
    for (int64_t t = 0; t < T; t++) {
        const float *rt = x->r + (t * H + h) * N, *kt = x->k + (t * H + h) * N, *vt = x->v + (t * H + h) * N;
        const float *wt = x->w + t * x->w_tstride + h * N;
        float *o = x->out + (t * H + h) * N;
        for (int64_t j = 0; j < N; j++) o[j] = 0.f;
        for (int64_t i = 0; i < N; i++) {
            float ki = kt[i], ri = rt[i], wi = wt[i], ui = uh[i];
            float *Si = S + i * N;
            #pragma omp simd
            for (int64_t j = 0; j < N; j++) {
                float kv = ki * vt[j];
                o[j] += ri * (ui * kv + Si[j]);
                Si[j] = Si[j] * wi + kv;
            }
        }
    }
}

void rk_wkv5(int64_t T, int64_t H, int64_t N, const float *r, const float *k, const float *v,
             const float *w, int64_t w_tstride, const float *u, const float *s_in, float *s_out, float *out,
             int n_threads) {
    wkv5_ctx_t ctx = { T, H, N, r, k, v, w, w_tstride, u, s_in, s_out, out };
    pool_run(wkv5_unit, &ctx, H, T >= 4 ? n_threads : 1);
}

/* v7: S [H][V][K]; S <- S diag(w_t) - (S kk_t) (kk_t * a_t)^T + v_t k_t^T; out_t = S r_t.
   All of r, w, k, v, kk, a: [T, H, N]; N <= 1024. */
typedef struct { int64_t T, H, N; const float *r, *w, *k, *v, *kk, *a, *s_in; float *s_out, *out; int stream; } wkv7_ctx_t;
/* stream: write s_out past the caches (a batch's states are read again only on its next step) */

static void wkv7_unit(void *arg, int64_t h) {
    /* Works on the transposed state St[k][v] so every inner loop runs over v without reductions. */
    const wkv7_ctx_t *x = (const wkv7_ctx_t *)arg;
    int64_t T = x->T, H = x->H, N = x->N;
    if (T == 1) {  /* one token (decode): S[v][k] in place, a dot product per row, no transposes */
        int64_t off = h * N;
        const float *S = x->s_in + h * N * N, *rt = x->r + off, *wt = x->w + off, *kt = x->k + off, *vt = x->v + off,
                    *kkt = x->kk + off, *at = x->a + off;
        float *S_out = x->s_out + h * N * N, *out = x->out + off, b[1024];
        for (int64_t j = 0; j < N; j++) b[j] = kkt[j] * at[j];
#ifdef RK_AVX512
        if (N % 16 == 0) {
            int stream = x->stream && ((uintptr_t)S_out & 63) == 0;
            for (int64_t i = 0; i < N; i++) {
                const float *row = S + i * N;
                float *new_row = S_out + i * N;
                __m512 sa = _mm512_setzero_ps(), o = _mm512_setzero_ps();
                for (int64_t j = 0; j < N; j += 16) sa = _mm512_fmadd_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(kkt + j), sa);
                __m512 sab = _mm512_set1_ps(_mm512_reduce_add_ps(sa)), vi = _mm512_set1_ps(vt[i]);
                for (int64_t j = 0; j < N; j += 16) {
                    __m512 s = _mm512_fnmadd_ps(sab, _mm512_loadu_ps(b + j), _mm512_mul_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(wt + j)));
                    s = _mm512_fmadd_ps(vi, _mm512_loadu_ps(kt + j), s);
                    if (stream) _mm512_stream_ps(new_row + j, s);
                    else _mm512_storeu_ps(new_row + j, s);
                    o = _mm512_fmadd_ps(s, _mm512_loadu_ps(rt + j), o);
                }
                out[i] = _mm512_reduce_add_ps(o);
            }
            if (stream) _mm_sfence();
            return;
        }
#endif
        for (int64_t i = 0; i < N; i++) {
            const float *row = S + i * N;
            float *new_row = S_out + i * N, sa = 0.f, o = 0.f, vi = vt[i];
            #pragma omp simd reduction(+:sa)
            for (int64_t j = 0; j < N; j++) sa += row[j] * kkt[j];
            #pragma omp simd reduction(+:o)
            for (int64_t j = 0; j < N; j++) {
                float s = row[j] * wt[j] - sa * b[j] + vi * kt[j];
                new_row[j] = s;
                o += s * rt[j];
            }
            out[i] = o;
        }
        return;
    }
    float small[64 * 64], sa[1024], o[1024];
    float *St = N <= 64 ? small : (float *)malloc(sizeof(float) * N * N);
    const float *S_in = x->s_in + h * N * N;
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) St[j * N + i] = S_in[i * N + j];
    for (int64_t t = 0; t < T; t++) {
        int64_t off = (t * H + h) * N;
        const float *rt = x->r + off, *wt = x->w + off, *kt = x->k + off, *vt = x->v + off, *kkt = x->kk + off, *at = x->a + off;
        for (int64_t i = 0; i < N; i++) { sa[i] = 0.f; o[i] = 0.f; }
        for (int64_t j = 0; j < N; j++) {
            const float *row = St + j * N; float c = kkt[j];
            #pragma omp simd
            for (int64_t i = 0; i < N; i++) sa[i] -= row[i] * c;
        }
        for (int64_t j = 0; j < N; j++) {
            float *row = St + j * N;
            float wj = wt[j], bj = kkt[j] * at[j], kj = kt[j], rj = rt[j];
            #pragma omp simd
            for (int64_t i = 0; i < N; i++) {
                float s = row[i] * wj + sa[i] * bj + vt[i] * kj;
                row[i] = s;
                o[i] += s * rj;
            }
        }
        float *out = x->out + off;
        for (int64_t i = 0; i < N; i++) out[i] = o[i];
    }
    float *S_out = x->s_out + h * N * N;
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) S_out[i * N + j] = St[j * N + i];
    if (St != small) free(St);
}

void rk_wkv7(int64_t T, int64_t H, int64_t N, const float *r, const float *w, const float *k, const float *v,
             const float *kk, const float *a, const float *s_in, float *s_out, float *out, int n_threads) {
    wkv7_ctx_t ctx = { T, H, N, r, w, k, v, kk, a, s_in, s_out, out, 0 };
    pool_run(wkv7_unit, &ctx, H, T >= 4 ? n_threads : 1);
}

/* ---------------------------------------------------------------- fused single-token steps
   Vectors are fp32 or bf16 (`bf` says which) except where noted; math is fp32. */
static inline float ld(const void *p, int bf, int64_t i) { return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i]; }
static inline void st(void *p, int bf, int64_t i, float v) { if (bf) ((uint16_t *)p)[i] = f32_to_bf16(v); else ((float *)p)[i] = v; }
static inline float sigmoidf_(float x) { return 1.f / (1.f + rk_exp(-x)); }

/* GroupNorm over heads of x (fp32 [H*N]), then optionally times g or silu(g): y = gn(x) [* gate]. */
void rk_group_norm_gate(int64_t H, int64_t N, const float *x, const void *ln_w, const void *ln_b, int ln_bf, float eps,
                        const void *g, int g_mode, int bf, void *y) {
    for (int64_t h = 0; h < H; h++) {
        const float *xh = x + h * N;
        float mean = 0.f, var = 0.f;
        for (int64_t i = 0; i < N; i++) mean += xh[i];
        mean /= (float)N;
        for (int64_t i = 0; i < N; i++) { float d = xh[i] - mean; var += d * d; }
        float inv = 1.f / sqrtf(var / (float)N + eps);
        for (int64_t i = 0; i < N; i++) {
            int64_t c = h * N + i;
            float o = (xh[i] - mean) * inv * ld(ln_w, ln_bf, c) + ld(ln_b, ln_bf, c);
            if (g_mode == 1) o *= ld(g, bf, c);
            else if (g_mode == 2) { float gv = ld(g, bf, c); o *= gv * sigmoidf_(gv); }
            st(y, bf, c, o);
        }
    }
}

/* RWKV-7 time mixing after the projections, one token: decay, in-context rate, removal key, value
   residual, the WKV step, GroupNorm, the r.k bonus and the gate. Writes y = the output
   projection's input and v_out = the (mixed) value; s_out = the new state [H][V][K]. */
/* The same with the activations (r ... v_first, y, v_out) in one dtype (`bf`) and the parameters
   (a0 ... ln_b) in another (`pbf`); w0 is fp32. */
/* p as fp32: itself, or (bf16) converted into `scratch` [n] */
static const float *as_f32(const void *p, int bf, int64_t n, float *scratch) {
    if (!bf || p == NULL) return (const float *)p;
    for (int64_t i = 0; i < n; i++) scratch[i] = bf16_to_f32(((const uint16_t *)p)[i]);
    return scratch;
}

static void v7_tail(int64_t H, int64_t N, int bf, int pbf,
                    const void *r_, const void *k_, const void *v_, const void *w_lora_, const void *a_lora_,
                    const void *g_, const void *v_lora_, const void *v_first_, const float *w0, const void *a0_,
                    const void *k_k_, const void *k_a_, const void *v0_, const void *r_k_, const void *ln_w_,
                    const void *ln_b_, const float *s_in, float *s_out, void *y, void *v_out, int stream,
                    int64_t h0, int64_t h1) {
    /* heads h0 .. h1 - 1 only (every step below is per head, so any split gives the same bits) */
    int64_t C = H * N, c0 = h0 * N, c1 = h1 * N;
    float *buf = (float *)scratch_buffer(&tail_scratch, sizeof(float) * C * 24);
    float *rr = buf, *ww = buf + C, *kk = buf + 2 * C, *aa = buf + 3 * C, *k2 = buf + 4 * C, *v2 = buf + 5 * C,
          *o = buf + 6 * C, *yf = buf + 7 * C, *scratch = buf + 8 * C;
    /* every input as fp32 (the fused layer's activations already are), so the loops vectorize */
    const float *r = as_f32(r_, bf, C, scratch), *k = as_f32(k_, bf, C, scratch + C), *v = as_f32(v_, bf, C, scratch + 2 * C);
    const float *w_lora = as_f32(w_lora_, bf, C, scratch + 3 * C), *a_lora = as_f32(a_lora_, bf, C, scratch + 4 * C);
    const float *g = as_f32(g_, bf, C, scratch + 5 * C), *v_lora = as_f32(v_lora_, bf, C, scratch + 6 * C);
    const float *v_first = as_f32(v_first_, bf, C, scratch + 7 * C), *a0 = as_f32(a0_, pbf, C, scratch + 8 * C);
    const float *k_k = as_f32(k_k_, pbf, C, scratch + 9 * C), *k_a = as_f32(k_a_, pbf, C, scratch + 10 * C);
    const float *v0 = as_f32(v0_, pbf, C, scratch + 11 * C), *r_k = as_f32(r_k_, pbf, C, scratch + 12 * C);
    const float *ln_w = as_f32(ln_w_, pbf, C, scratch + 13 * C), *ln_b = as_f32(ln_b_, pbf, C, scratch + 14 * C);
    for (int64_t c = c0; c < c1; c++) {
        float a = sigmoidf_(a0[c] + a_lora[c]), kc = k[c];
        rr[c] = r[c];
        ww[c] = rk_exp(-RK_V7_DECAY_SCALE * sigmoidf_(w0[c] + w_lora[c]));
        aa[c] = a;
        kk[c] = kc * k_k[c];
        k2[c] = kc * (1.f + (a - 1.f) * k_a[c]);
    }
    if (v_first != NULL)  /* value residual: blend in layer 0's values */
        for (int64_t c = c0; c < c1; c++) v2[c] = v[c] + (v_first[c] - v[c]) * sigmoidf_(v0[c] + v_lora[c]);
    else
        for (int64_t c = c0; c < c1; c++) v2[c] = v[c];
    for (int64_t h = h0; h < h1; h++) {
        float *kh = kk + h * N, norm = 0.f;
        for (int64_t i = 0; i < N; i++) norm += kh[i] * kh[i];
        norm = sqrtf(norm);
        float inv = 1.f / (norm > 1e-12f ? norm : 1e-12f);
        for (int64_t i = 0; i < N; i++) kh[i] *= inv;
    }
    wkv7_ctx_t ctx = { 1, H, N, rr, ww, k2, v2, kk, aa, s_in, s_out, o, stream };
    for (int64_t h = h0; h < h1; h++) wkv7_unit(&ctx, h);
    for (int64_t h = h0; h < h1; h++) {
        const float *oh = o + h * N;
        float mean = 0.f, var = 0.f, bonus = 0.f;
        for (int64_t i = 0; i < N; i++) mean += oh[i];
        mean /= (float)N;
        for (int64_t i = 0; i < N; i++) { float d = oh[i] - mean; var += d * d; }
        float inv = 1.f / sqrtf(var / (float)N + 64e-5f);
        for (int64_t i = 0; i < N; i++) { int64_t c = h * N + i; bonus += rr[c] * k2[c] * r_k[c]; }
        for (int64_t i = 0; i < N; i++) {
            int64_t c = h * N + i;
            yf[c] = ((oh[i] - mean) * inv * ln_w[c] + ln_b[c] + bonus * v2[c]) * g[c];
        }
    }
    for (int64_t c = c0; c < c1; c++) { st(y, bf, c, yf[c]); st(v_out, bf, c, v2[c]); }
}

void rk_v7_step(int64_t H, int64_t N, int bf,
                const void *r, const void *k, const void *v, const void *w_lora, const void *a_lora, const void *g,
                const void *v_lora, const void *v_first, const float *w0, const void *a0, const void *k_k,
                const void *k_a, const void *v0, const void *r_k, const void *ln_w, const void *ln_b,
                const float *s_in, float *s_out, void *y, void *v_out) {
    v7_tail(H, N, bf, bf, r, k, v, w_lora, a_lora, g, v_lora, v_first, w0, a0, k_k, k_a, v0, r_k, ln_w, ln_b,
            s_in, s_out, y, v_out, 0, 0, H);
}


/* ---------------------------------------------------------------- one whole layer, one token
   The decode step of a layer in one call, for B sequences at once (one token each; B = 1 for a
   single conversation): layer norms, token shift mixes, every projection (as rk_gemv jobs over
   the B rows, so any weight format rk_gemv knows, the weights read once for all rows), the small
   LoRA nonlinearities, the time-mix tail and the FFN. Every row's arithmetic is the same whatever
   B is. Activations stay fp32 throughout (the weights may be bf16 or int8: rk_gemv rounds its
   input to what the weight format multiplies with); parameters and the token-shift states are in
   the layer's dtype (`pbf`). Per-row arrays are [B, ...] contiguous. */

static void layer_norm_f(const float *x, const void *w, const void *b, int pbf, int64_t C, float *y) {
    float mean = 0.f, var = 0.f;
    for (int64_t c = 0; c < C; c++) mean += x[c];
    mean /= (float)C;
    for (int64_t c = 0; c < C; c++) { float d = x[c] - mean; var += d * d; }
    float inv = 1.f / sqrtf(var / (float)C + 1e-5f);
    for (int64_t c = 0; c < C; c++) y[c] = (x[c] - mean) * inv * ld(w, pbf, c) + ld(b, pbf, c);
}

/* jobs[i] = lin[i] reading the B rows x[i] into y[i], with fp32 input and output */
static void run_jobs(const job_t *lin, int n, float *const *x, float *const *y, int64_t B, int n_threads) {
    job_t jobs[16];
    for (int i = 0; i < n; i++) {
        jobs[i] = lin[i];
        jobs[i].x = x[i]; jobs[i].y = y[i];
        jobs[i].flags = (jobs[i].flags & ~(int64_t)(256 | 512) & 0xffffffffLL) | (B << 32);
    }
    rk_gemv(n, jobs, n_threads);
}

static void relu_square(float *h, int64_t n) {
    for (int64_t i = 0; i < n; i++) { float v = h[i] > 0.f ? h[i] : 0.f; h[i] = v * v; }
}

/* A sequence's states in a batch: where its token-shift and WKV states are read and written. */
typedef struct { const void *att_in; void *att_out; const void *ffn_in; void *ffn_out; const float *s_in; float *s_out; } row_states_t;

typedef struct {
    const v7_layer_t *L;
    const row_states_t *rows;
    int64_t C;
    int nv;
    float *r, *k, *v, *w_lora, *a_lora, *g, *v_lora, *y, *v_out;
    const float *v_first_in;
    int stream;  /* a batch: new states written past the caches */
    int64_t parts;  /* units per sequence, each a range of its heads (fewer sequences than threads) */
} v7_tails_t;

static void v7_tail_unit(void *arg, int64_t u) {
    const v7_tails_t *t = (const v7_tails_t *)arg;
    const v7_layer_t *L = t->L;
    int64_t b = u / t->parts, part = u % t->parts, i = b * t->C;
    v7_tail(L->H, L->N, 0, (int)L->pbf, t->r + i, t->k + i, t->v + i, t->w_lora + i, t->a_lora + i, t->g + i,
            t->nv ? t->v_lora + i : NULL, t->nv ? t->v_first_in + i : NULL, L->w0, L->a0, L->k_k, L->k_a, L->v0,
            L->r_k, L->lnx_w, L->lnx_b, t->rows[b].s_in, t->rows[b].s_out, t->y + i, t->v_out + i, t->stream,
            L->H * part / t->parts, L->H * (part + 1) / t->parts);
}

/* How many ranges of heads each sequence's recurrence tail is split into: enough units for the
   threads when there are fewer sequences than threads, never more than the heads. */
static int64_t head_parts(int64_t B, int64_t H, int n_threads) {
    int64_t parts = B >= n_threads ? 1 : (n_threads + B - 1) / B;
    return parts < H ? parts : H;
}

/* The token-shift mixes of a batch, a sequence per unit: the time mix's (ffn 0) x_m = xa + (previous
   xa - xa) * mix_m for m = r w k v a g with xa = ln1(x), mix [6][B][C]; the channel mix's (ffn 1)
   one with x_k and xa = ln2(x). */
typedef struct { const v7_layer_t *L; const row_states_t *rows; const float *x; float *xa, *mix; int64_t C, BC; int ffn; } v7_mix_t;

static void v7_mix_unit(void *arg, int64_t b) {
    const v7_mix_t *t = (const v7_mix_t *)arg;
    const v7_layer_t *L = t->L;
    const row_states_t *row = &t->rows[b];
    int64_t C = t->C;
    int pbf = (int)L->pbf;
    float *xa = t->xa + b * C, *mix = t->mix + b * C;
    layer_norm_f(t->x + b * C, t->ffn ? L->ln2_w : L->ln1_w, t->ffn ? L->ln2_b : L->ln1_b, pbf, C, xa);
    for (int64_t c = 0; c < C; c++) {
        if (t->ffn) {
            mix[c] = xa[c] + (ld(row->ffn_in, pbf, c) - xa[c]) * ld(L->x_k, pbf, c);
            st(row->ffn_out, pbf, c, xa[c]);
        } else {
            float d = ld(row->att_in, pbf, c) - xa[c];
            for (int m = 0; m < 6; m++) mix[m * t->BC + c] = xa[c] + d * ld(L->mix, pbf, m * C + c);
            st(row->att_out, pbf, c, xa[c]);
        }
    }
}

void rk_v7_layer(const v7_layer_t *L, int64_t B, float *x, const void *states, const float *v_first_in,
                 float *v_first_out, int n_threads) {
    const row_states_t *rows = (const row_states_t *)states;
    int64_t H = L->H, N = L->N, C = H * N, F = L->lin[12].n_out, BC = B * C;
    int64_t rank = 0;
    for (int i = 3; i < 7; i++) rank += L->lin[i].n_out;
    float *buf = (float *)scratch_buffer(&layer_scratch, sizeof(float) * B * (C * 17 + rank + F));
    float *xa = buf, *mix = xa + BC, *r = mix + 6 * BC, *k = r + BC, *v = k + BC, *lora = v + BC, *y = lora + 4 * BC,
          *o = y + BC, *vout = o + BC, *low = vout + BC, *h = low + B * rank;
    float *lw = low, *la = lw + B * L->lin[3].n_out, *lg = la + B * L->lin[4].n_out, *lv = lg + B * L->lin[5].n_out;
    v7_mix_t mixes = { L, rows, x, xa, mix, C, BC, 0 };
    pool_run(v7_mix_unit, &mixes, B, B > 1 ? n_threads : 1);
    float *xr = mix, *xw = mix + BC, *xk = mix + 2 * BC, *xv = mix + 3 * BC, *xaa = mix + 4 * BC, *xg = mix + 5 * BC;
    int nv = L->has_v ? 1 : 0;
    float *x1[7] = { xr, xk, xv, xw, xaa, xg, xv }, *y1[7] = { r, k, v, lw, la, lg, lv };
    run_jobs(L->lin, 6 + nv, x1, y1, B, n_threads);
    for (int64_t i = 0; i < B * L->lin[3].n_out; i++) lw[i] = tanhf(lw[i]);
    for (int64_t i = 0; i < B * L->lin[5].n_out; i++) lg[i] = sigmoidf_(lg[i]);
    float *w_lora = lora, *a_lora = lora + BC, *g = lora + 2 * BC, *v_lora = lora + 3 * BC;
    float *x2[4] = { lw, la, lg, lv }, *y2[4] = { w_lora, a_lora, g, v_lora };
    run_jobs(L->lin + 7, 3 + nv, x2, y2, B, n_threads);
    v7_tails_t tails = { L, rows, C, nv, r, k, v, w_lora, a_lora, g, v_lora, y, v_first_out ? v_first_out : vout,
                         v_first_in, B > 1, head_parts(B, H, n_threads) };
    pool_run(v7_tail_unit, &tails, B * tails.parts, n_threads);  /* the sequences' recurrences side by side */
    float *x3[1] = { y }, *y3[1] = { o };
    run_jobs(L->lin + 11, 1, x3, y3, B, n_threads);
    for (int64_t i = 0; i < BC; i++) x[i] += o[i];
    /* channel mix: x += value(relu(key(mix(ln2(x))))^2) */
    mixes.ffn = 1;
    pool_run(v7_mix_unit, &mixes, B, B > 1 ? n_threads : 1);
    float *x4[1] = { mix }, *y4[1] = { h };
    run_jobs(L->lin + 12, 1, x4, y4, B, n_threads);
    relu_square(h, B * F);
    float *x5[1] = { h }, *y5[1] = { o };
    run_jobs(L->lin + 13, 1, x5, y5, B, n_threads);
    for (int64_t i = 0; i < BC; i++) x[i] += o[i];
}

typedef struct {
    const v6_layer_t *L;
    const row_states_t *rows;
    float *r, *k, *v, *g, *decay, *o, *y;
    int64_t parts;  /* units per sequence, each a range of its heads (as v7_tails_t) */
} v6_tails_t;

static void v6_tail_unit(void *arg, int64_t u) {
    const v6_tails_t *t = (const v6_tails_t *)arg;
    const v6_layer_t *L = t->L;
    int64_t H = L->H, N = L->N, b = u / t->parts, part = u % t->parts, i = b * H * N;
    int64_t h0 = H * part / t->parts, h1 = H * (part + 1) / t->parts, c = i + h0 * N;
    wkv5_ctx_t ctx = { 1, H, N, t->r + i, t->k + i, t->v + i, t->decay + i, 0, L->bonus, t->rows[b].s_in,
                       t->rows[b].s_out, t->o + i };
    for (int64_t hh = h0; hh < h1; hh++) wkv5_unit(&ctx, hh);
    rk_group_norm_gate(h1 - h0, N, t->o + c, L->lnx_w + h0 * N, L->lnx_b + h0 * N, 0, 64e-5f, t->g + c, 2, 0,
                       t->y + c);
}

void rk_v6_layer(const v6_layer_t *L, int64_t B, float *x, const void *states, int n_threads) {
    const row_states_t *rows = (const row_states_t *)states;
    int64_t H = L->H, N = L->N, C = H * N, F = L->lin[14].n_out, D = L->lin[0].n_out / 5, Dd = L->lin[10].n_out;
    int64_t BC = B * C;
    int pbf = (int)L->pbf;
    float *buf = (float *)scratch_buffer(&layer_scratch, sizeof(float) * B * (C * 18 + 10 * D + Dd + F));
    float *xa = buf, *delta = xa + BC, *lora = delta + BC, *mix = lora + 5 * BC, *r = mix + 5 * BC, *k = r + BC,
          *v = k + BC, *g = v + BC, *o = g + BC, *y = o + BC, *low = y + BC, *lows = low + 5 * B * D,
          *dlow = lows + 5 * B * D, *h = dlow + B * Dd;
    /* ddlerp: five data-dependent token-shift mixes w k v r g */
    for (int64_t b = 0; b < B; b++) {
        layer_norm_f(x + b * C, L->ln1_w, L->ln1_b, pbf, C, xa + b * C);
        for (int64_t c = 0; c < C; c++) {
            int64_t i = b * C + c;
            delta[i] = ld(rows[b].att_in, pbf, c) - xa[i];
            mix[i] = xa[i] + delta[i] * ld(L->maa_x, pbf, c);
            st(rows[b].att_out, pbf, c, xa[i]);
        }
    }
    float *x0[1] = { mix }, *y0[1] = { low };
    run_jobs(L->lin, 1, x0, y0, B, n_threads);
    /* low is [B][5][D]; each of the five second projections reads its [B][D] slice (lows) */
    for (int64_t b = 0; b < B; b++)
        for (int m = 0; m < 5; m++)
            for (int64_t i = 0; i < D; i++) lows[(m * B + b) * D + i] = tanhf(low[(b * 5 + m) * D + i]);
    float *x1[5], *y1[5];
    for (int m = 0; m < 5; m++) { x1[m] = lows + m * B * D; y1[m] = lora + m * BC; }
    run_jobs(L->lin + 1, 5, x1, y1, B, n_threads);
    for (int m = 0; m < 5; m++)
        for (int64_t b = 0; b < B; b++)
            for (int64_t c = 0; c < C; c++) {
                int64_t i = b * C + c;
                mix[m * BC + i] = xa[i] + delta[i] * (lora[m * BC + i] + ld(L->maa, pbf, m * C + c));
            }
    float *xw = mix, *xk = mix + BC, *xv = mix + 2 * BC, *xr = mix + 3 * BC, *xg = mix + 4 * BC;
    float *x2[5] = { xr, xk, xv, xg, xw }, *y2[5] = { r, k, v, g, dlow };
    run_jobs(L->lin + 6, 5, x2, y2, B, n_threads);
    for (int64_t i = 0; i < B * Dd; i++) dlow[i] = tanhf(dlow[i]);
    float *decay = lora;  /* reused */
    float *x3[1] = { dlow }, *y3[1] = { decay };
    run_jobs(L->lin + 11, 1, x3, y3, B, n_threads);
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++) decay[b * C + c] = rk_exp(-rk_exp(L->decay[c] + decay[b * C + c]));
    v6_tails_t tails = { L, rows, r, k, v, g, decay, o, y, head_parts(B, H, n_threads) };
    pool_run(v6_tail_unit, &tails, B * tails.parts, n_threads);  /* the sequences' recurrences side by side */
    float *x4[1] = { y }, *y4[1] = { o };
    run_jobs(L->lin + 12, 1, x4, y4, B, n_threads);  /* output */
    for (int64_t i = 0; i < BC; i++) x[i] += o[i];
    /* channel mix: sigmoid(receptance) * value(relu(key)^2) */
    for (int64_t b = 0; b < B; b++) {
        layer_norm_f(x + b * C, L->ln2_w, L->ln2_b, pbf, C, xa + b * C);
        for (int64_t c = 0; c < C; c++) {
            int64_t i = b * C + c;
            float d = ld(rows[b].ffn_in, pbf, c) - xa[i];
            mix[i] = xa[i] + d * ld(L->ffn_maa, pbf, c);
            mix[BC + i] = xa[i] + d * ld(L->ffn_maa, pbf, C + c);
            st(rows[b].ffn_out, pbf, c, xa[i]);
        }
    }
    float *x5[2] = { mix, mix + BC }, *y5[2] = { r, h };
    run_jobs(L->lin + 13, 2, x5, y5, B, n_threads);
    relu_square(h, B * F);
    float *x6[1] = { h }, *y6[1] = { o };
    run_jobs(L->lin + 15, 1, x6, y6, B, n_threads);
    for (int64_t i = 0; i < BC; i++) x[i] += sigmoidf_(r[i]) * o[i];
}

void rk_layers(int version, int64_t n, const int64_t *layers, int64_t B, float *x, const void *states,
               float *v_first, int n_threads) {
    for (int64_t i = 0; i < n; i++) {
        const void *rows = (const row_states_t *)states + i * B;
        if (version == 6)
            rk_v6_layer((const v6_layer_t *)layers[i], B, x, rows, n_threads);
        else
            rk_v7_layer((const v7_layer_t *)layers[i], B, x, rows, i ? v_first : NULL, i ? NULL : v_first, n_threads);
    }
}
