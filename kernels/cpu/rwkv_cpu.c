/* The optional CPU kernels (interface and overview: rwkv_cpu.h). */
#include "rwkv_cpu.h"

#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define RK_AVX512 1
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

/* Run fn(ctx, u) for u in [0, total) on the caller and up to n_threads - 1 helpers. */
static void pool_run(unit_fn fn, void *ctx, int64_t total, int n_threads) {
    if (total <= 0) return;
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

enum { K_F32 = 0, K_BF16 = 1, K_I8 = 2, K_I4 = 3 };
#define GROUP 32  /* weights per fp16 scale along the input (int8 and int4) */
#define RK_V7_DECAY_SCALE 0.6065306597126334f  /* e^-0.5: an RWKV-7 decay is exp(-e^-0.5 sigmoid(.)), v7.DECAY_SCALE */

/* job_t and its flags: see rwkv_cpu.h */

typedef struct {
    float *xf;        /* x as fp32 */
    int16_t *xq;      /* x rounded to int16 (int8 rows) */
    uint8_t *xlo, *xhi; /* its low byte and its high byte + 128 */
    int8_t *x8;       /* int4 rows: x rounded to int8 per group of 32 (zero-padded to whole groups) */
    float *xsl;       /* ... each group's scale, per 64 inputs as 16 lanes (8 per group) */
    int32_t *xnl;     /* ... minus each group's sum of x8, in the same lanes */
    uint16_t *xb;     /* x as bf16 (bf16 rows) */
    int32_t *nz;      /* indices of nonzero inputs (cols layout) */
    int64_t n_nz;
    float xs;         /* int16 scale */
    int64_t units;    /* work units of this job */
    int64_t rows_per_unit;
    float *part;      /* cols layout: one partial sum [n_out] per work unit, summed after the run */
} prep_t;

static inline float bf16_to_f32(uint16_t v) { union { uint32_t u; float f; } c; c.u = (uint32_t)v << 16; return c.f; }
static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } c; c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);  /* NaN */
    uint32_t rounding = 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)((c.u + rounding) >> 16);
}

/* ---------------------------------------------------------------- rows layout: y[r] = W[r,:] . x
   fp32 and bf16 rows: like the int8 rows below, each row is streamed on its own into four
   independent accumulators and reduced at once. */
#ifdef RK_AVX512
static __attribute__((noinline)) float row_f32_dot(const float *w, const float *x, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 64 <= n; c += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), _mm512_loadu_ps(x + c + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 32), _mm512_loadu_ps(x + c + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 48), _mm512_loadu_ps(x + c + 48), a3);
    }
    for (; c < n; c += 16) {
        __mmask16 m = n - c >= 16 ? 0xffff : (__mmask16)((1u << (n - c)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + c), _mm512_maskz_loadu_ps(m, x + c), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif

static void rows_f32(const float *W, const float *x, float *y, int64_t r0, int64_t r1, int64_t n) {
    int64_t r = r0;
#ifdef RK_AVX512
    for (; r < r1; r++) y[r] = row_f32_dot(W + r * n, x, n);
#endif
    for (; r < r1; r++) {
        const float *w = W + r * n; float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t c = 0; c < n; c++) s += w[c] * x[c];
        y[r] = s;
    }
}

#if defined(RK_AVX512) && defined(__AVX512BF16__)
static __attribute__((noinline)) float row_bf16_dot(const uint16_t *w, const uint16_t *x, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 128 <= n; c += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + c), (__m512bh)_mm512_loadu_si512(x + c));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + c + 32), (__m512bh)_mm512_loadu_si512(x + c + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + c + 64), (__m512bh)_mm512_loadu_si512(x + c + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + c + 96), (__m512bh)_mm512_loadu_si512(x + c + 96));
    }
    for (; c < n; c += 32) {
        __mmask32 m = n - c >= 32 ? 0xffffffffu : (__mmask32)((1u << (n - c)) - 1);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + c), (__m512bh)_mm512_maskz_loadu_epi16(m, x + c));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif

static void rows_bf16(const uint16_t *W, const uint16_t *xb, const float *xf, float *y, int64_t r0, int64_t r1, int64_t n) {
    int64_t r = r0;
#if defined(RK_AVX512) && defined(__AVX512BF16__)
    for (; r < r1; r++) y[r] = row_bf16_dot(W + r * n, xb, n);
#endif
    for (; r < r1; r++) {
        const uint16_t *w = W + r * n; float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t c = 0; c < n; c++) s += bf16_to_f32(w[c]) * bf16_to_f32(xb[c]);
        y[r] = s;
    }
    (void)xf;
}

/* Group-wise int8 and int4 rows (quant.py's format): W[r, k] = q[r, k] * scale[r, k / 32], the
   scales fp16. The dot product of each group of 32 is exact in int32 and scaled in fp32.

   int8: x is rounded to int16 for the whole vector and split as x = 256 * hi + lo (lo in [0, 255],
   hi in [-128, 127]); both bytes feed VNNI u8 x s8 products, hi offset by +128, which adds
   32768 * sum_g scale_g * sum(q in g) to every row: `corr` (one float per row, made at load).
   int4: q + 8 in [0, 15] is stored as nibbles, per 64 inputs byte i holding input i (low) and
   input i + 32 (high) (a last group of 32: i and i + 16); x is rounded to int8 per group of 32
   (llama.cpp's Q4_0 x Q8_0 dot), and the +8 offset comes off through the group sums of x. */
static inline int32_t nibble(const uint8_t *row, int64_t k, int64_t n32) {
    int64_t base = k / 64 * 64, half = (n32 - base >= 64 ? 64 : n32 - base) / 2, i = k - base;
    uint8_t b = row[base / 2 + i % half];
    return (int32_t)(i < half ? b & 15 : b >> 4) - 8;
}

#if defined(RK_AVX512) && defined(__AVX512VNNI__)
/* lanes 0-7: the scale of group g, lanes 8-15: of group g + 1 (0 past the last group) */
static inline __m512 pair_scales(const uint16_t *s, int64_t g, int64_t n_groups) {
    __m128i two = _mm_maskz_loadu_epi16(g + 1 < n_groups ? 3 : 1, s + g);
    const __m256i idx = _mm256_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_cvtph_ps(_mm256_permutexvar_epi16(idx, _mm256_castsi128_si256(two)));
}

static inline __m512i i8_pair(__m512i w, const uint8_t *xlo, const uint8_t *xhi, __mmask64 m) {
    __m512i z = _mm512_setzero_si512();
    __m512i l = _mm512_dpbusd_epi32(z, _mm512_maskz_loadu_epi8(m, xlo), w);
    __m512i h = _mm512_dpbusd_epi32(z, _mm512_maskz_loadu_epi8(m, xhi), w);
    return _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);  /* |h| <= 4 * 255 * 127: no overflow */
}

static __attribute__((noinline)) float row_i8_dot(const int8_t *w, const uint16_t *s, const uint8_t *xlo,
                                                  const uint8_t *xhi, int64_t n) {
    int64_t ng = (n + GROUP - 1) / GROUP, c = 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    /* four groups' scales at once: lanes [s0 x8, s1 x8] and [s2 x8, s3 x8] */
    const __m512i first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(2));
    for (; c + 128 <= n; c += 128) {
        __m512 s4 = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(s + c / GROUP))));
        __m512i p = i8_pair(_mm512_loadu_si512(w + c), xlo + c, xhi + c, ~0ull);
        __m512i q = i8_pair(_mm512_loadu_si512(w + c + 64), xlo + c + 64, xhi + c + 64, ~0ull);
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(first, s4), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_permutexvar_ps(second, s4), a1);
    }
    for (; c < n; c += 64) {
        __mmask64 m = n - c >= 64 ? ~0ull : (~0ull) >> (64 - (n - c));
        __m512i p = i8_pair(_mm512_maskz_loadu_epi8(m, w + c), xlo + c, xhi + c, m);
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_scales(s, c / GROUP, ng), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static __attribute__((noinline)) float row_i4_dot(const uint8_t *w, const uint16_t *s, const int8_t *x8,
                                                  const float *xsl, const int32_t *xnl, int64_t n32) {
    const __m256i low = _mm256_set1_epi8(15);
    int64_t ng = n32 / GROUP, c = 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; c + 64 <= n32; c += 64) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + c / 2));
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low)),
                                       _mm256_and_si256(_mm256_srli_epi16(v, 4), low), 1);
        __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(xnl + c / 4), q, _mm512_loadu_si512(x8 + c));
        __m512 f = _mm512_mul_ps(pair_scales(s, c / GROUP, ng), _mm512_loadu_ps(xsl + c / 4));
        if ((c / 64) & 1) a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, a1);
        else a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, a0);
    }
    if (c < n32) {  /* a last group of 32 */
        __m128i v = _mm_loadu_si128((const __m128i *)(w + c / 2)), l = _mm_set1_epi8(15);
        __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, l)), _mm_and_si128(_mm_srli_epi16(v, 4), l), 1);
        __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(xnl + c / 4), _mm512_zextsi256_si512(q),
                                        _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(x8 + c))));
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(pair_scales(s, c / GROUP, ng), _mm512_loadu_ps(xsl + c / 4)), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

static inline float half_to_f32(uint16_t h) {
#ifdef RK_AVX512
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    union { uint32_t u; float f; } c;
    if (e == 0) { c.f = ldexpf((float)m, -24); c.u |= sign; return c.f; }
    c.u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    return c.f;
#endif
}

static void rows_i8(const int8_t *W, const uint16_t *scale, const float *corr, const prep_t *p, float *y,
                    int64_t r0, int64_t r1, int64_t n) {
    int64_t ng = (n + GROUP - 1) / GROUP, r = r0;
#if defined(RK_AVX512) && defined(__AVX512VNNI__)
    for (; r < r1; r++) y[r] = (row_i8_dot(W + r * n, scale + r * ng, p->xlo, p->xhi, n) - corr[r]) * p->xs;
#endif
    for (; r < r1; r++) {
        const int8_t *w = W + r * n; float s = 0.f;
        for (int64_t g = 0; g < ng; g++) {
            int64_t acc = 0;
            for (int64_t c = g * GROUP; c < n && c < (g + 1) * GROUP; c++) acc += (int32_t)w[c] * (int32_t)p->xq[c];
            s += (float)acc * half_to_f32(scale[r * ng + g]);
        }
        y[r] = s * p->xs;
    }
    (void)corr;
}

static void rows_i4(const uint8_t *W, const uint16_t *scale, const prep_t *p, float *y, int64_t r0, int64_t r1, int64_t n) {
    int64_t n32 = (n + GROUP - 1) / GROUP * GROUP, ng = n32 / GROUP, r = r0;
#if defined(RK_AVX512) && defined(__AVX512VNNI__)
    for (; r < r1; r++) y[r] = row_i4_dot(W + r * (n32 / 2), scale + r * ng, p->x8, p->xsl, p->xnl, n32);
#endif
    for (; r < r1; r++) {
        const uint8_t *w = W + r * (n32 / 2); float s = 0.f;
        for (int64_t g = 0; g < ng; g++) {
            int32_t acc = 0;
            for (int64_t c = g * GROUP; c < (g + 1) * GROUP; c++) acc += nibble(w, c, n32) * (int32_t)p->x8[c];
            s += (float)acc * half_to_f32(scale[r * ng + g]) * p->xsl[g * 8];
        }
        y[r] = s;
    }
}

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

/* ---------------------------------------------------------------- driver */

static void run_unit(const job_t *jb, const prep_t *p, int64_t u, float *yf) {
    int kind = (int)(jb->flags & 15), cols = (int)((jb->flags >> 4) & 1);
    if (cols) {
        int64_t q0 = u * p->rows_per_unit, q1 = q0 + p->rows_per_unit < p->n_nz ? q0 + p->rows_per_unit : p->n_nz;
        cols_block(kind, jb->w, p->xf, p->nz, q0, q1, p->part + u * jb->n_out, jb->n_out);
        return;
    }
    int64_t r0 = u * p->rows_per_unit, r1 = r0 + p->rows_per_unit < jb->n_out ? r0 + p->rows_per_unit : jb->n_out;
    if (kind == K_I8) rows_i8((const int8_t *)jb->w, (const uint16_t *)jb->scale, (const float *)(intptr_t)jb->tag, p, yf,
                              r0, r1, jb->n_in);
    else if (kind == K_I4) rows_i4((const uint8_t *)jb->w, (const uint16_t *)jb->scale, p, yf, r0, r1, jb->n_in);
    else if (kind == K_BF16) rows_bf16((const uint16_t *)jb->w, p->xb, p->xf, yf, r0, r1, jb->n_in);
    else rows_f32((const float *)jb->w, p->xf, yf, r0, r1, jb->n_in);
}

typedef struct { const job_t *jobs; const prep_t *prep; float **ybuf; int n_jobs; int64_t first[17]; } gemv_ctx_t;

static void gemv_unit(void *arg, int64_t u) {
    gemv_ctx_t *c = (gemv_ctx_t *)arg;
    int i = 0;
    while (u >= c->first[i + 1]) i++;
    run_unit(&c->jobs[i], &c->prep[i], u - c->first[i], c->ybuf[i]);
}

int rk_gemv(int n_jobs, const job_t *jobs, int n_threads) {
    prep_t prep[16]; float *ybuf[16];
    if (n_jobs > 16) return -1;
    int64_t total = 0;
    for (int i = 0; i < n_jobs; i++) {
        const job_t *jb = &jobs[i]; prep_t *p = &prep[i];
        int64_t n = jb->n_in, kind = jb->flags & 15, cols = (jb->flags >> 4) & 1;
        memset(p, 0, sizeof(*p));
        p->xf = (float *)malloc(sizeof(float) * n);
        if (jb->flags & 256) { const uint16_t *xb = (const uint16_t *)jb->x; for (int64_t c = 0; c < n; c++) p->xf[c] = bf16_to_f32(xb[c]); }
        else memcpy(p->xf, jb->x, sizeof(float) * n);
        ybuf[i] = (jb->flags & 512) ? (float *)malloc(sizeof(float) * jb->n_out) : (float *)jb->y;
        int finite = 1;
        for (int64_t c = 0; c < n; c++) finite &= isfinite(p->xf[c]) != 0;
        if (!finite) {  /* a diverged activation: every output is NaN, as a float product would make it */
            for (int64_t o = 0; o < jb->n_out; o++) ybuf[i][o] = NAN;
            continue;
        }
        if (cols) {
            p->nz = (int32_t *)malloc(sizeof(int32_t) * (n + 4));
            for (int64_t c = 0; c < n; c++)
                if (p->xf[c] != 0.f) p->nz[p->n_nz++] = (int32_t)c;
            /* blocks of nonzero inputs, each into its own partial sums (summed below) */
            int64_t units = (p->n_nz + 31) / 32;
            units = units > 8 ? 8 : units;
            p->rows_per_unit = units ? (p->n_nz + units - 1) / units : 1;
            p->units = units;
            p->part = (float *)malloc(sizeof(float) * jb->n_out * (units ? units : 1));
        } else {
            if (kind == K_I8) {
                float m = 0.f;
                for (int64_t c = 0; c < n; c++) { float a = fabsf(p->xf[c]); m = a > m ? a : m; }
                p->xq = (int16_t *)malloc(sizeof(int16_t) * n);
                p->xs = m > 0.f ? m / 32767.f : 1.f;
                float inv = 1.f / p->xs;
                p->xlo = (uint8_t *)malloc(n); p->xhi = (uint8_t *)malloc(n);
                for (int64_t c = 0; c < n; c++) {
                    int32_t q = (int32_t)lrintf(p->xf[c] * inv);
                    q = q > 32767 ? 32767 : (q < -32767 ? -32767 : q);
                    p->xq[c] = (int16_t)q; p->xlo[c] = (uint8_t)(q & 255); p->xhi[c] = (uint8_t)((q >> 8) + 128);
                }
            } else if (kind == K_I4) {
                int64_t n32 = (n + GROUP - 1) / GROUP * GROUP;
                p->x8 = (int8_t *)calloc((size_t)n32 + 64, 1);
                p->xsl = (float *)calloc((size_t)n32 / 4 + 16, sizeof(float));
                p->xnl = (int32_t *)calloc((size_t)n32 / 4 + 16, sizeof(int32_t));
                for (int64_t g = 0; g < n32 / GROUP; g++) {
                    float m = 0.f;
                    for (int64_t c = g * GROUP; c < n && c < (g + 1) * GROUP; c++) { float a = fabsf(p->xf[c]); m = a > m ? a : m; }
                    float xs = m / 127.f, inv = m > 0.f ? 127.f / m : 0.f;
                    int32_t sum = 0;
                    for (int64_t c = g * GROUP; c < n && c < (g + 1) * GROUP; c++) {
                        int32_t q = (int32_t)lrintf(p->xf[c] * inv);
                        p->x8[c] = (int8_t)q; sum += q;
                    }
                    for (int l = 0; l < 8; l++) { p->xsl[g * 8 + l] = xs; p->xnl[g * 8 + l] = -sum; }
                }
            } else if (kind == K_BF16) {
                p->xb = (uint16_t *)malloc(sizeof(uint16_t) * n);
                for (int64_t c = 0; c < n; c++) p->xb[c] = f32_to_bf16(p->xf[c]);
            }
            int64_t bytes = kind == K_I4 ? n / 2 : n * (kind == K_F32 ? 4 : kind == K_BF16 ? 2 : 1);
            int64_t rpu = (64 * 1024) / (bytes > 0 ? bytes : 1);
            rpu = rpu < 4 ? 4 : (rpu / 4) * 4;
            p->rows_per_unit = rpu;
            p->units = (jb->n_out + rpu - 1) / rpu;
        }
        total += p->units;
    }
    gemv_ctx_t ctx = { jobs, prep, ybuf, n_jobs, {0} };
    for (int i = 0; i < n_jobs; i++) ctx.first[i + 1] = ctx.first[i] + prep[i].units;
    pool_run(gemv_unit, &ctx, total, n_threads);
    for (int i = 0; i < n_jobs; i++) {
        if (prep[i].part) {
            int64_t n_out = jobs[i].n_out;
            float *y = ybuf[i];
            for (int64_t o = 0; o < n_out; o++) y[o] = 0.f;
            for (int64_t u = 0; u < prep[i].units; u++) {
                const float *part = prep[i].part + u * n_out;
                for (int64_t o = 0; o < n_out; o++) y[o] += part[o];
            }
        }
        if (jobs[i].flags & 512) {
            uint16_t *yb = (uint16_t *)jobs[i].y;
            for (int64_t o = 0; o < jobs[i].n_out; o++) yb[o] = f32_to_bf16(ybuf[i][o]);
            free(ybuf[i]);
        }
        free(prep[i].xf); free(prep[i].xq); free(prep[i].xlo); free(prep[i].xhi); free(prep[i].xb); free(prep[i].nz); free(prep[i].part);
        free(prep[i].x8); free(prep[i].xsl); free(prep[i].xnl);
    }
    return 0;
}

/* ---------------------------------------------------------------- dequantize (prefill)
   Rows r0..r1 of a group-wise int8/int4 weight as fp32 or bf16 [rows, n], for torch's GEMMs. */
typedef struct { int bits; int64_t r0, n; const void *q; const uint16_t *scale; void *out; int out_bf16; } deq_ctx_t;

static void deq_unit(void *arg, int64_t u) {
    const deq_ctx_t *c = (const deq_ctx_t *)arg;
    int64_t n = c->n, ng = (n + GROUP - 1) / GROUP, n32 = ng * GROUP, r = c->r0 + u;
    const uint16_t *s = c->scale + r * ng;
    float buf[GROUP];
    for (int64_t g = 0; g < ng; g++) {
        int64_t k0 = g * GROUP, width = n - k0 < GROUP ? n - k0 : GROUP;
        float sc = half_to_f32(s[g]);
        if (c->bits == 8) {
            const int8_t *q = (const int8_t *)c->q + r * n + k0;
            #pragma omp simd
            for (int64_t i = 0; i < width; i++) buf[i] = (float)q[i] * sc;
        } else {
            const uint8_t *q = (const uint8_t *)c->q + r * (n32 / 2);
            for (int64_t i = 0; i < width; i++) buf[i] = (float)nibble(q, k0 + i, n32) * sc;
        }
        if (c->out_bf16) {
            uint16_t *o = (uint16_t *)c->out + u * n + k0;
            for (int64_t i = 0; i < width; i++) o[i] = f32_to_bf16(buf[i]);
        } else memcpy((float *)c->out + u * n + k0, buf, sizeof(float) * width);
    }
}

void rk_dequant_groups(int bits, int64_t r0, int64_t r1, int64_t n, const void *q, const void *scale, void *out,
                       int out_bf16, int n_threads) {
    deq_ctx_t ctx = { bits, r0, n, q, (const uint16_t *)scale, out, out_bf16 };
    pool_run(deq_unit, &ctx, r1 - r0, (r1 - r0) * n >= 65536 ? n_threads : 1);
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
typedef struct { int64_t T, H, N; const float *r, *w, *k, *v, *kk, *a, *s_in; float *s_out, *out; } wkv7_ctx_t;

static void wkv7_unit(void *arg, int64_t h) {
    /* Works on the transposed state St[k][v] so every inner loop runs over v without reductions. */
    const wkv7_ctx_t *x = (const wkv7_ctx_t *)arg;
    int64_t T = x->T, H = x->H, N = x->N;
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
    wkv7_ctx_t ctx = { T, H, N, r, w, k, v, kk, a, s_in, s_out, out };
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
static void v7_tail(int64_t H, int64_t N, int bf, int pbf,
                    const void *r, const void *k, const void *v, const void *w_lora, const void *a_lora, const void *g,
                    const void *v_lora, const void *v_first, const float *w0, const void *a0, const void *k_k,
                    const void *k_a, const void *v0, const void *r_k, const void *ln_w, const void *ln_b,
                    const float *s_in, float *s_out, void *y, void *v_out) {
    int64_t C = H * N;
    float *buf = (float *)malloc(sizeof(float) * C * 7);
    float *rr = buf, *ww = buf + C, *kk = buf + 2 * C, *aa = buf + 3 * C, *k2 = buf + 4 * C, *v2 = buf + 5 * C, *o = buf + 6 * C;
    for (int64_t c = 0; c < C; c++) {
        float a = sigmoidf_(ld(a0, pbf, c) + ld(a_lora, bf, c));
        float kc = ld(k, bf, c), vc = ld(v, bf, c);
        rr[c] = ld(r, bf, c);
        ww[c] = rk_exp(-RK_V7_DECAY_SCALE * sigmoidf_(w0[c] + ld(w_lora, bf, c)));
        aa[c] = a;
        kk[c] = kc * ld(k_k, pbf, c);
        k2[c] = kc * (1.f + (a - 1.f) * ld(k_a, pbf, c));
        if (v_first != NULL) {
            float mix = sigmoidf_(ld(v0, pbf, c) + ld(v_lora, bf, c));
            vc = vc + (ld(v_first, bf, c) - vc) * mix;
        }
        v2[c] = vc;
    }
    for (int64_t h = 0; h < H; h++) {
        float *kh = kk + h * N, norm = 0.f;
        for (int64_t i = 0; i < N; i++) norm += kh[i] * kh[i];
        norm = sqrtf(norm);
        float inv = 1.f / (norm > 1e-12f ? norm : 1e-12f);
        for (int64_t i = 0; i < N; i++) kh[i] *= inv;
    }
    wkv7_ctx_t ctx = { 1, H, N, rr, ww, k2, v2, kk, aa, s_in, s_out, o };
    for (int64_t h = 0; h < H; h++) wkv7_unit(&ctx, h);
    for (int64_t h = 0; h < H; h++) {
        const float *oh = o + h * N;
        float mean = 0.f, var = 0.f, bonus = 0.f;
        for (int64_t i = 0; i < N; i++) mean += oh[i];
        mean /= (float)N;
        for (int64_t i = 0; i < N; i++) { float d = oh[i] - mean; var += d * d; }
        float inv = 1.f / sqrtf(var / (float)N + 64e-5f);
        for (int64_t i = 0; i < N; i++) { int64_t c = h * N + i; bonus += rr[c] * k2[c] * ld(r_k, pbf, c); }
        for (int64_t i = 0; i < N; i++) {
            int64_t c = h * N + i;
            float gn = (oh[i] - mean) * inv * ld(ln_w, pbf, c) + ld(ln_b, pbf, c);
            st(y, bf, c, (gn + bonus * v2[c]) * ld(g, bf, c));
            st(v_out, bf, c, v2[c]);
        }
    }
    free(buf);
}

void rk_v7_step(int64_t H, int64_t N, int bf,
                const void *r, const void *k, const void *v, const void *w_lora, const void *a_lora, const void *g,
                const void *v_lora, const void *v_first, const float *w0, const void *a0, const void *k_k,
                const void *k_a, const void *v0, const void *r_k, const void *ln_w, const void *ln_b,
                const float *s_in, float *s_out, void *y, void *v_out) {
    v7_tail(H, N, bf, bf, r, k, v, w_lora, a_lora, g, v_lora, v_first, w0, a0, k_k, k_a, v0, r_k, ln_w, ln_b,
            s_in, s_out, y, v_out);
}


/* ---------------------------------------------------------------- one whole layer, one token
   The decode step of a layer in one call: layer norms, token shift mixes, every projection (as
   rk_gemv jobs, so any weight format rk_gemv knows), the small LoRA nonlinearities, the time-mix
   tail and the FFN. Activations stay fp32 throughout (the weights may be bf16 or int8: rk_gemv
   rounds its input to what the weight format multiplies with); parameters and the token-shift
   states are in the layer's dtype (`pbf`). */

static void layer_norm_f(const float *x, const void *w, const void *b, int pbf, int64_t C, float *y) {
    float mean = 0.f, var = 0.f;
    for (int64_t c = 0; c < C; c++) mean += x[c];
    mean /= (float)C;
    for (int64_t c = 0; c < C; c++) { float d = x[c] - mean; var += d * d; }
    float inv = 1.f / sqrtf(var / (float)C + 1e-5f);
    for (int64_t c = 0; c < C; c++) y[c] = (x[c] - mean) * inv * ld(w, pbf, c) + ld(b, pbf, c);
}

/* jobs[i] = lin[i] reading x[i] into y[i], with fp32 input and output */
static void run_jobs(const job_t *lin, int n, float *const *x, float *const *y, int n_threads) {
    job_t jobs[16];
    for (int i = 0; i < n; i++) {
        jobs[i] = lin[i];
        jobs[i].x = x[i]; jobs[i].y = y[i];
        jobs[i].flags &= ~(int64_t)(256 | 512);
    }
    rk_gemv(n, jobs, n_threads);
}

/* FFN of v7 (relu^2 key, value) and the residual: x += value(relu(key(mix(ln2(x))))^2). */
static void relu_sq_ffn(const job_t *key, const job_t *value, const float *xk, float *h, float *o, float *x,
                        int64_t C, int n_threads) {
    float *kx[1] = { (float *)xk }, *ky[1] = { h };
    run_jobs(key, 1, kx, ky, n_threads);
    for (int64_t i = 0; i < key->n_out; i++) { float v = h[i] > 0.f ? h[i] : 0.f; h[i] = v * v; }
    float *vx[1] = { h }, *vy[1] = { o };
    run_jobs(value, 1, vx, vy, n_threads);
    for (int64_t c = 0; c < C; c++) x[c] += o[c];
}

void rk_v7_layer(const v7_layer_t *L, float *x, const void *att_in, void *att_out, const void *ffn_in, void *ffn_out,
                 const float *s_in, float *s_out, const float *v_first_in, float *v_first_out, int n_threads) {
    int64_t H = L->H, N = L->N, C = H * N, F = L->lin[12].n_out, pbf = (int)L->pbf;
    int64_t rank = 0;
    for (int i = 3; i < 7; i++) rank += L->lin[i].n_out;
    float *buf = (float *)malloc(sizeof(float) * (C * 17 + rank + F));
    float *xa = buf, *mix = buf + C, *r = mix + 6 * C, *k = r + C, *v = k + C, *lora = v + C, *y = lora + 4 * C,
          *o = y + C, *vout = o + C, *low = vout + C, *h = low + rank;
    float *lw = low, *la = lw + L->lin[3].n_out, *lg = la + L->lin[4].n_out, *lv = lg + L->lin[5].n_out;
    /* time mix: x_m = xa + (previous xa - xa) * mix_m for m = r w k v a g */
    layer_norm_f(x, L->ln1_w, L->ln1_b, pbf, C, xa);
    for (int64_t c = 0; c < C; c++) {
        float d = ld(att_in, pbf, c) - xa[c];
        for (int m = 0; m < 6; m++) mix[m * C + c] = xa[c] + d * ld(L->mix, pbf, m * C + c);
        st(att_out, pbf, c, xa[c]);
    }
    float *xr = mix, *xw = mix + C, *xk = mix + 2 * C, *xv = mix + 3 * C, *xaa = mix + 4 * C, *xg = mix + 5 * C;
    int nv = L->has_v ? 1 : 0;
    float *x1[7] = { xr, xk, xv, xw, xaa, xg, xv }, *y1[7] = { r, k, v, lw, la, lg, lv };
    run_jobs(L->lin, 6 + nv, x1, y1, n_threads);
    for (int64_t i = 0; i < L->lin[3].n_out; i++) lw[i] = tanhf(lw[i]);
    for (int64_t i = 0; i < L->lin[5].n_out; i++) lg[i] = sigmoidf_(lg[i]);
    float *w_lora = lora, *a_lora = lora + C, *g = lora + 2 * C, *v_lora = lora + 3 * C;
    float *x2[4] = { lw, la, lg, lv }, *y2[4] = { w_lora, a_lora, g, v_lora };
    run_jobs(L->lin + 7, 3 + nv, x2, y2, n_threads);
    v7_tail(H, N, 0, pbf, r, k, v, w_lora, a_lora, g, nv ? v_lora : NULL, nv ? v_first_in : NULL, L->w0, L->a0,
            L->k_k, L->k_a, L->v0, L->r_k, L->lnx_w, L->lnx_b, s_in, s_out, y, v_first_out ? v_first_out : vout);
    float *x3[1] = { y }, *y3[1] = { o };
    run_jobs(L->lin + 11, 1, x3, y3, n_threads);
    for (int64_t c = 0; c < C; c++) x[c] += o[c];
    /* channel mix */
    layer_norm_f(x, L->ln2_w, L->ln2_b, pbf, C, xa);
    for (int64_t c = 0; c < C; c++) {
        mix[c] = xa[c] + (ld(ffn_in, pbf, c) - xa[c]) * ld(L->x_k, pbf, c);
        st(ffn_out, pbf, c, xa[c]);
    }
    relu_sq_ffn(&L->lin[12], &L->lin[13], mix, h, o, x, C, n_threads);
    free(buf);
}

void rk_v6_layer(const v6_layer_t *L, float *x, const void *att_in, void *att_out, const void *ffn_in, void *ffn_out,
                 const float *s_in, float *s_out, int n_threads) {
    int64_t H = L->H, N = L->N, C = H * N, F = L->lin[14].n_out, D = L->lin[0].n_out / 5, Dd = L->lin[10].n_out;
    int pbf = (int)L->pbf;
    float *buf = (float *)malloc(sizeof(float) * (C * 18 + 5 * D + Dd + F));
    float *xa = buf, *delta = xa + C, *lora = delta + C, *mix = lora + 5 * C, *r = mix + 5 * C, *k = r + C,
          *v = k + C, *g = v + C, *o = g + C, *y = o + C, *low = y + C, *dlow = low + 5 * D, *h = dlow + Dd;
    /* ddlerp: five data-dependent token-shift mixes w k v r g */
    layer_norm_f(x, L->ln1_w, L->ln1_b, pbf, C, xa);
    for (int64_t c = 0; c < C; c++) {
        delta[c] = ld(att_in, pbf, c) - xa[c];
        mix[c] = xa[c] + delta[c] * ld(L->maa_x, pbf, c);
        st(att_out, pbf, c, xa[c]);
    }
    float *x0[1] = { mix }, *y0[1] = { low };
    run_jobs(L->lin, 1, x0, y0, n_threads);
    for (int64_t i = 0; i < 5 * D; i++) low[i] = tanhf(low[i]);
    float *x1[5], *y1[5];
    for (int i = 0; i < 5; i++) { x1[i] = low + i * D; y1[i] = lora + i * C; }
    run_jobs(L->lin + 1, 5, x1, y1, n_threads);
    for (int m = 0; m < 5; m++)
        for (int64_t c = 0; c < C; c++) mix[m * C + c] = xa[c] + delta[c] * (lora[m * C + c] + ld(L->maa, pbf, m * C + c));
    float *xw = mix, *xk = mix + C, *xv = mix + 2 * C, *xr = mix + 3 * C, *xg = mix + 4 * C;
    float *x2[5] = { xr, xk, xv, xg, xw }, *y2[5] = { r, k, v, g, dlow };
    run_jobs(L->lin + 6, 5, x2, y2, n_threads);
    for (int64_t i = 0; i < Dd; i++) dlow[i] = tanhf(dlow[i]);
    float *decay = lora;  /* reused */
    float *x3[1] = { dlow }, *y3[1] = { decay };
    run_jobs(L->lin + 11, 1, x3, y3, n_threads);
    for (int64_t c = 0; c < C; c++) decay[c] = rk_exp(-rk_exp(L->decay[c] + decay[c]));
    wkv5_ctx_t ctx = { 1, H, N, r, k, v, decay, 0, L->bonus, s_in, s_out, o };
    for (int64_t hh = 0; hh < H; hh++) wkv5_unit(&ctx, hh);
    rk_group_norm_gate(H, N, o, L->lnx_w, L->lnx_b, 0, 64e-5f, g, 2, 0, y);
    float *x4[1] = { y }, *y4[1] = { o };
    run_jobs(L->lin + 12, 1, x4, y4, n_threads);  /* output */
    for (int64_t c = 0; c < C; c++) x[c] += o[c];
    /* channel mix: sigmoid(receptance) * value(relu(key)^2) */
    layer_norm_f(x, L->ln2_w, L->ln2_b, pbf, C, xa);
    for (int64_t c = 0; c < C; c++) {
        float d = ld(ffn_in, pbf, c) - xa[c];
        mix[c] = xa[c] + d * ld(L->ffn_maa, pbf, c);
        mix[C + c] = xa[c] + d * ld(L->ffn_maa, pbf, C + c);
        st(ffn_out, pbf, c, xa[c]);
    }
    float *x5[2] = { mix, mix + C }, *y5[2] = { r, h };
    run_jobs(L->lin + 13, 2, x5, y5, n_threads);
    for (int64_t i = 0; i < F; i++) { float q = h[i] > 0.f ? h[i] : 0.f; h[i] = q * q; }
    float *x6[1] = { h }, *y6[1] = { o };
    run_jobs(L->lin + 15, 1, x6, y6, n_threads);
    for (int64_t c = 0; c < C; c++) x[c] += sigmoidf_(r[c]) * o[c];
    free(buf);
}
