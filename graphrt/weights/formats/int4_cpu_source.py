"""C++ source of the CPU int4 kernel (int4_cpu.py builds and calls it): y = x W'^T for bf16 activations and the
"blocked" int4 layout (int4_gemv.py), the layout the GPU streams, so a CPU-lane group holds the GPU's bytes.

Layout: w uint8 [N, K/2]: columns in blocks of 64, byte j of a block holding column j (low nibble) and 32 + j
(high nibble); sz bf16 [K/G, N, 2] (scale, zero); W'[o, i] = (q - 8) * scale + zero (int4.py).

The math, in float32 operations that both paths below compute one for one (their results are bitwise equal):
  - The kernel works in 128-column chunks (group sizes 128 and 256). A chunk's 64 bytes are 32 16-bit words; the
    nibbles at bits 4p..4p+3 of the words (p = 0..3) form four vectors of 32 codes, each code q as the bfloat16
    16 + q (exponent 4, mantissa 8q: exact). The activations are permuted once per call to the same order
    (`chunk_col`), each
    group's float32 sum X_g taken in order.
  - Per vector p, 16 lanes: lane l = w'[2l+1] x[2l+1] + w'[2l] x[2l], added to 0 in that order (float32 adds,
    round to nearest even; the product of two bfloat16 is exact): AVX512-BF16's vdpbf16ps.
  - Lane totals: t[l] = fma((a0 + a1) + (a2 + a3), scale of the chunk's group, t[l]) over the chunks; the 16 lanes
    are then added as a tree (l + 8, l + 4, l + 2, l + 1).
  - (q - 8) = w' - 24, so y = tree + (an fma chain over the groups of c_g X_g), c_g = zero_g - 24 scale_g and X_g
    the float32 sum of the group's activations in order; y is rounded to bfloat16.
Compiled with -ffp-contract=off: every fma above is explicit.
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* what both paths share: the tail of a row */
static inline float tree16(const float* t) {
    float t8[8], t4[4], t2[2];
    for (int i = 0; i < 8; ++i) t8[i] = t[i] + t[i + 8];
    for (int i = 0; i < 4; ++i) t4[i] = t8[i] + t8[i + 4];
    for (int i = 0; i < 2; ++i) t2[i] = t4[i] + t4[i + 2];
    return t2[0] + t2[1];
}

static inline float zero_term(const uint16_t* sz, const float* X, int o, int N, int ng) {
    float z = 0.0f;
    for (int g = 0; g < ng; ++g) {
        float s = bf16_to_f32(sz[((size_t)g * N + o) * 2]), zero = bf16_to_f32(sz[((size_t)g * N + o) * 2 + 1]);
        z = fmaf(zero - 24.0f * s, X[g], z);
    }
    return z;
}

/* Column (within its 128-column chunk) of the nibble at bits 4p..4p+3 of 16-bit word i of the chunk's 64 bytes:
   byte 2i + p / 2, its high nibble if p is odd; byte b holds column 64 (b / 32) + b % 32 (+ 32 if high). */
static inline int chunk_col(int i, int p) {
    int byte = 2 * i + p / 2;
    return 64 * (byte / 32) + byte % 32 + 32 * (p % 2);
}

static inline uint16_t out_bf16(float y, const uint16_t* residual, size_t at) {
    return f32_to_bf16(residual ? bf16_to_f32(residual[at]) + y : y);
}

static inline uint16_t code_bf16(int q) { return (uint16_t)(0x4180 | (q << 3)); }   /* 16 + q */

/* the portable path: the same operations, lane by lane */
static void rows_portable(const uint16_t* xp, const uint8_t* w, const uint16_t* sz, uint16_t* y, const float* X,
                          int B, int N, int K, int G, int o0, int o1, const uint16_t* residual) {
    int ng = K / G, nc = K / 128;
    for (int o = o0; o < o1; ++o) {
        const uint8_t* wr = w + (size_t)o * (K / 2);
        for (int b = 0; b < B; ++b) {
            const uint16_t* xb = xp + (size_t)b * K;
            float t[16] = {0};
            for (int c = 0; c < nc; ++c) {
                const uint8_t* cw = wr + 64 * c;
                float a[4][16] = {{0}};
                for (int p = 0; p < 4; ++p)
                    for (int l = 0; l < 16; ++l)
                        for (int e = 1; e >= 0; --e) {
                            int i = 2 * l + e, byte = 2 * i + p / 2;
                            int q = p % 2 ? cw[byte] >> 4 : cw[byte] & 15;
                            a[p][l] = a[p][l] + bf16_to_f32(code_bf16(q)) * bf16_to_f32(xb[128 * c + 32 * p + i]);
                        }
                float s = bf16_to_f32(sz[((size_t)(c * 128 / G) * N + o) * 2]);
                for (int l = 0; l < 16; ++l) t[l] = fmaf((a[0][l] + a[1][l]) + (a[2][l] + a[3][l]), s, t[l]);
            }
            y[(size_t)b * N + o] = out_bf16(tree16(t) + zero_term(sz, X + (size_t)b * ng, o, N, ng), residual,
                                            (size_t)b * N + o);
        }
    }
}

#if defined(__x86_64__)
/* bytes ahead of the read that each chunk prefetches: the rows of a task are contiguous, and the hardware's own
   prefetch alone left one thread at about 6 GB/s from DRAM (11 G weights/s; 18 with this, ATen's kernel 14.5; on the
   2-core development machine) */
#define PREFETCH 8192
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
/* the bfloat16 16 + q of the nibbles at bits 4p..4p+3 of each word: ((v >> (4p - 3)) & 0x78) | 0x4180 */
TGT static inline __m512bh nibbles(__m512i v, int p) {
    __m512i sh = p == 0 ? _mm512_slli_epi16(v, 3) : p == 1 ? _mm512_srli_epi16(v, 1)
               : p == 2 ? _mm512_srli_epi16(v, 5) : _mm512_srli_epi16(v, 9);
    return (__m512bh)_mm512_ternarylogic_epi32(sh, _mm512_set1_epi16(0x78), _mm512_set1_epi16(0x4180), 0xEA);
}

template <int NB>
TGT static void rows_avx512(const uint16_t* xp, const uint8_t* w, const uint16_t* sz, uint16_t* y, const float* X,
                            int N, int K, int G, int o0, int o1, const uint16_t* residual) {
    int ng = K / G, nc = K / 128, cpg = G / 128;   /* chunks per group: 1 or 2 */
    float zt[NB][16];                              /* the rows' zero terms, 16 rows in the lanes of a vector */
    if (o1 - o0 == 16) {
        __m512 zv[NB];
        for (int b = 0; b < NB; ++b) zv[b] = _mm512_setzero_ps();
        for (int g = 0; g < ng; ++g) {
            __m512i pair = _mm512_loadu_si512((const void*)(sz + ((size_t)g * N + o0) * 2));   /* (scale, zero) x 16 */
            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xffff0000u)));
            __m512 c = _mm512_sub_ps(ze, _mm512_mul_ps(_mm512_set1_ps(24.0f), sc));
            for (int b = 0; b < NB; ++b) zv[b] = _mm512_fmadd_ps(c, _mm512_set1_ps(X[(size_t)b * ng + g]), zv[b]);
        }
        for (int b = 0; b < NB; ++b) _mm512_storeu_ps(zt[b], zv[b]);
    } else {
        for (int b = 0; b < NB; ++b)
            for (int o = o0; o < o1; ++o) zt[b][o - o0] = zero_term(sz, X + (size_t)b * ng, o, N, ng);
    }
    for (int o = o0; o < o1; ++o) {
        const uint8_t* wr = w + (size_t)o * (K / 2);
        __m512 t[NB];
        for (int b = 0; b < NB; ++b) t[b] = _mm512_setzero_ps();
        const uint16_t* so = sz + (size_t)o * 2;      /* this row's (scale, zero) of group 0; group g at + g N 2 */
        for (int c = 0; c < nc; ++c) {
            _mm_prefetch((const char*)(wr + 64 * c + PREFETCH), _MM_HINT_T0);   /* never faults */
            __m512i v = _mm512_loadu_si512((const void*)(wr + 64 * c));
            __m512bh w0 = nibbles(v, 0), w1 = nibbles(v, 1), w2 = nibbles(v, 2), w3 = nibbles(v, 3);
            __m512 s = _mm512_set1_ps(bf16_to_f32(so[(size_t)(cpg == 1 ? c : c >> 1) * N * 2]));
            #pragma GCC unroll 4
            for (int b = 0; b < NB; ++b) {
                const uint16_t* xc = xp + (size_t)b * K + 128 * c;
                __m512 z = _mm512_setzero_ps();
                __m512 a0 = _mm512_dpbf16_ps(z, w0, (__m512bh)_mm512_loadu_si512((const void*)xc));
                __m512 a1 = _mm512_dpbf16_ps(z, w1, (__m512bh)_mm512_loadu_si512((const void*)(xc + 32)));
                __m512 a2 = _mm512_dpbf16_ps(z, w2, (__m512bh)_mm512_loadu_si512((const void*)(xc + 64)));
                __m512 a3 = _mm512_dpbf16_ps(z, w3, (__m512bh)_mm512_loadu_si512((const void*)(xc + 96)));
                t[b] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), s, t[b]);
            }
        }
        for (int b = 0; b < NB; ++b) {
            float tl[16];
            _mm512_storeu_ps(tl, t[b]);
            y[(size_t)b * N + o] = out_bf16(tree16(tl) + zt[b][o - o0], residual, (size_t)b * N + o);
        }
    }
}

/* rows o0..o1 for every batch row, four at a time (a chunk's weights stay in cache between batch chunks) */
TGT static void rows_avx512_all(const uint16_t* xp, const uint8_t* w, const uint16_t* sz, uint16_t* y,
                                const float* X, int B, int N, int K, int G, int o0, int o1, const uint16_t* residual) {
    int ng = K / G;
    for (int b0 = 0; b0 < B; b0 += 4) {
        const uint16_t* xb = xp + (size_t)b0 * K;
        uint16_t* yb = y + (size_t)b0 * N;
        const float* Xb = X + (size_t)b0 * ng;
        const uint16_t* rb = residual ? residual + (size_t)b0 * N : 0;
        switch (B - b0 < 4 ? B - b0 : 4) {
            case 1: rows_avx512<1>(xb, w, sz, yb, Xb, N, K, G, o0, o1, rb); break;
            case 2: rows_avx512<2>(xb, w, sz, yb, Xb, N, K, G, o0, o1, rb); break;
            case 3: rows_avx512<3>(xb, w, sz, yb, Xb, N, K, G, o0, o1, rb); break;
            default: rows_avx512<4>(xb, w, sz, yb, Xb, N, K, G, o0, o1, rb); break;
        }
    }
}
#endif

extern "C" int graphrt_int4_has_avx512bf16(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") ? 1 : 0;
#else
    return 0;
#endif
}

/* The input row the product reads, in bfloat16 like the steps apart (models/fused.py's reference math), for
   columns i0..i1 of one row:
   norm:  bf16(nw * bf16(x * r)), r = 1 / sqrt(mean(x^2) + eps) in float32 (`norm_scale`, the sum in order)
   silu:  x holds [gate | up] (2K): bf16(bf16(g / (1 + exp(-g))) * u)
   else:  x as it is */
static float norm_scale(const uint16_t* x, int K, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < K; ++i) { float v = bf16_to_f32(x[i]); ss = ss + v * v; }
    return 1.0f / sqrtf(ss / (float)K + eps);
}

static void input_cols(const uint16_t* x, uint16_t* xe, int K, int i0, int i1, const uint16_t* nw, float r, int silu) {
    for (int i = i0; i < i1; ++i) {
        if (nw) {
            xe[i] = f32_to_bf16(bf16_to_f32(nw[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * r)));
        } else if (silu) {
            float g = bf16_to_f32(x[i]);
            float sg = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            xe[i] = f32_to_bf16(sg * bf16_to_f32(x[K + i]));
        } else {
            xe[i] = x[i];
        }
    }
}

struct Int4Job {
    const uint16_t* x; const uint8_t* w; const uint16_t* sz; uint16_t* y; uint16_t* xe; uint16_t* xp; float* X;
    int B, N, K, G, ng, x_row, path, silu; const uint16_t* nw; const uint16_t* residual; float r[16];
};

static void int4_prep(void* c, int begin, int end) {   /* groups of rows: input columns, their order, their sum */
    Int4Job& j = *(Int4Job*)c;
    int K = j.K, G = j.G;
    for (int t = begin; t < end; ++t) {
        int b = t / j.ng, g = t % j.ng;
        uint16_t* eb = j.xe + (size_t)b * K;
        input_cols(j.x + (size_t)b * j.x_row, eb, K, g * G, g * G + G, j.nw, j.r[b], j.silu);
        for (int c = g * G / 128; c < (g + 1) * G / 128; ++c)
            for (int p = 0; p < 4; ++p)
                for (int i = 0; i < 32; ++i) j.xp[(size_t)b * K + 128 * c + 32 * p + i] = eb[128 * c + chunk_col(i, p)];
        float sum = 0.0f;
        for (int i = 0; i < G; ++i) sum = sum + bf16_to_f32(eb[g * G + i]);
        j.X[(size_t)b * j.ng + g] = sum;
    }
}

static void int4_rows(void* c, int begin, int end) {   /* tasks of 16 output rows */
    Int4Job& j = *(Int4Job*)c;
    for (int t = begin; t < end; ++t) {
        int o0 = 16 * t, o1 = o0 + 16 < j.N ? o0 + 16 : j.N;
#if defined(__x86_64__)
        if (j.path == 1) { rows_avx512_all(j.xp, j.w, j.sz, j.y, j.X, j.B, j.N, j.K, j.G, o0, o1, j.residual); continue; }
#endif
        rows_portable(j.xp, j.w, j.sz, j.y, j.X, j.B, j.N, j.K, j.G, o0, o1, j.residual);
    }
}

/* x bf16 [B, x_row] (x_row = K, or 2K with silu), w uint8 [N, K/2] (blocked), sz bf16 [K/G, N, 2] -> y bf16 [B, N];
   scratch: xe, xp bf16 [B, K] and X float [B, K/G]. nw (bf16 [K]) or null; residual (bf16 [B, N]) or null: y is
   then bf16(residual + the float32 product). G in 128, 256 dividing K; B <= 16. path 1: AVX512-BF16, 0: portable.
   Two pool jobs: the input rows by group, then the output rows. */
extern "C" void graphrt_int4_gemv(const uint16_t* x, const uint8_t* w, const uint16_t* sz, uint16_t* y,
                                  uint16_t* xe, uint16_t* xp, float* X, int B, int N, int K, int G, int threads,
                                  int path, const uint16_t* nw, float eps, int silu, const uint16_t* residual) {
    Int4Job j{x, w, sz, y, xe, xp, X, B, N, K, G, K / G, silu ? 2 * K : K, path, silu, nw, residual, {0}};
    for (int b = 0; b < B; ++b) j.r[b] = nw ? norm_scale(x + (size_t)b * j.x_row, K, eps) : 1.0f;
    pool_run(int4_prep, &j, B * j.ng, threads);
    pool_run(int4_rows, &j, (N + 15) / 16, threads);
}
"""
