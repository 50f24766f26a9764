"""C++ source of the CPU bfloat16 GEMV (bf16_cpu.py calls it; built into one library with int4_cpu_source.py,
whose helpers it uses): y = x W^T for a row-major bf16 W [N, K] (the bytes the GPU streams), 1..16 input rows,
the CPU lane's product. oneDNN's packed kernel read these matrices from DRAM at 55-80 GB/s on the H100 host
(tools/cpu_gemv_probe.py, weights cycled so the cache cannot serve them), torch's int8 kernel at 105-130; this
kernel: an MLP group at 150 GB/s (tools/lane_probe.py at 71b0da4, one row).

The math, in float32 operations that both paths compute one for one (bitwise equal):
  - Per 32-column chunk c of a row, in order, 16 lanes: lane l += w[2l+1] x[2l+1], then += w[2l] x[2l] (float32
    adds, round to nearest even; products of two bfloat16 are exact): AVX512-BF16's vdpbf16ps, one accumulator per
    (output row, input row).
  - The 16 lanes are added as a tree (l + 8, l + 4, l + 2, l + 1), and the sum rounded to bfloat16 (with a
    residual r: bf16(r + y), one rounding).
  - The vector path holds a tile of R output rows x up to 8 input rows in registers (R = 4 up to 4 input rows,
    else 2): each weight vector loaded serves every input row and each input vector every output row of the tile.
    On the H100 host this path is compute-bound from 4 rows (43-47 GB/s at 8): hence AMX below.
  - The input row may be formed first, as in the int4 kernel (`input_cols`: RMSNorm, or silu(gate) * up).
AMX (path 2, from bf16_cpu.AMX_ROWS input rows where the CPU has AMX-BF16): 16 output rows per tile, the input
rows transposed in pairs once per call, two accumulator tiles (even and odd 32-column chunks) added at the end. The tile unit sums in
an order of its own, so this path is not bitwise the portable one; it is tested against float64, for the same
bits at any thread count, and for each row's result not depending on the other rows.
"""

SOURCE = r"""
static void bf16_rows_portable(const uint16_t* xe, const uint16_t* w, uint16_t* y, int B, int N, int K,
                               int o0, int o1, const uint16_t* residual) {
    for (int o = o0; o < o1; ++o) {
        const uint16_t* wr = w + (size_t)o * K;
        for (int b = 0; b < B; ++b) {
            const uint16_t* xb = xe + (size_t)b * K;
            float a[16] = {0};
            for (int c = 0; c < K / 32; ++c)
                for (int l = 0; l < 16; ++l)
                    for (int e = 1; e >= 0; --e) {
                        int i = 32 * c + 2 * l + e;
                        a[l] = a[l] + bf16_to_f32(wr[i]) * bf16_to_f32(xb[i]);
                    }
            y[(size_t)b * N + o] = out_bf16(tree16(a), residual, (size_t)b * N + o);
        }
    }
}

#if defined(__x86_64__)
#define BF16_PREFETCH 2048   /* bytes ahead (measured here: 2 KB beat 8 and 32 KB on both 8B shapes) */
/* output rows o .. o + R - 1, input rows 0 .. NB - 1 of xe (R * NB accumulators) */
template <int R, int NB>
TGT static void bf16_tile(const uint16_t* xe, const uint16_t* w, uint16_t* y, int N, int K, int o,
                          const uint16_t* residual) {
    __m512 a[R][NB];
    const uint16_t* wr[R];
    for (int r = 0; r < R; ++r) {
        wr[r] = w + (size_t)(o + r) * K;
        for (int b = 0; b < NB; ++b) a[r][b] = _mm512_setzero_ps();
    }
    for (int c = 0; c < K / 32; ++c) {
        if ((c & 3) == 0)
            for (int r = 0; r < R; ++r)
                for (int line = 0; line < 4; ++line)
                    _mm_prefetch((const char*)(wr[r] + 32 * c) + BF16_PREFETCH + 64 * line, _MM_HINT_T0);
        __m512bh wv[R];
        #pragma GCC unroll 4
        for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512((const void*)(wr[r] + 32 * c));
        #pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(xe + (size_t)b * K + 32 * c));
            #pragma GCC unroll 4
            for (int r = 0; r < R; ++r) a[r][b] = _mm512_dpbf16_ps(a[r][b], wv[r], xv);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) {
            float t[16];
            _mm512_storeu_ps(t, a[r][b]);
            const size_t at = (size_t)b * N + o + r;
            y[at] = out_bf16(tree16(t), residual, at);
        }
}

template <int NB>
TGT static void bf16_rows_nb(const uint16_t* xe, const uint16_t* w, uint16_t* y, int N, int K, int o0, int o1,
                             const uint16_t* residual) {
    constexpr int R = NB <= 4 ? 4 : 2;
    int o = o0;
    for (; o + R <= o1; o += R) bf16_tile<R, NB>(xe, w, y, N, K, o, residual);
    for (; o < o1; ++o) bf16_tile<1, NB>(xe, w, y, N, K, o, residual);
}

TGT static void bf16_rows_avx512_all(const uint16_t* xe, const uint16_t* w, uint16_t* y, int B, int N, int K,
                                     int o0, int o1, const uint16_t* residual) {
    for (int b0 = 0; b0 < B; b0 += 8) {
        const uint16_t* xb = xe + (size_t)b0 * K;
        uint16_t* yb = y + (size_t)b0 * N;
        const uint16_t* rb = residual ? residual + (size_t)b0 * N : 0;
        switch (B - b0 < 8 ? B - b0 : 8) {
            case 1: bf16_rows_nb<1>(xb, w, yb, N, K, o0, o1, rb); break;
            case 2: bf16_rows_nb<2>(xb, w, yb, N, K, o0, o1, rb); break;
            case 3: bf16_rows_nb<3>(xb, w, yb, N, K, o0, o1, rb); break;
            case 4: bf16_rows_nb<4>(xb, w, yb, N, K, o0, o1, rb); break;
            case 5: bf16_rows_nb<5>(xb, w, yb, N, K, o0, o1, rb); break;
            case 6: bf16_rows_nb<6>(xb, w, yb, N, K, o0, o1, rb); break;
            case 7: bf16_rows_nb<7>(xb, w, yb, N, K, o0, o1, rb); break;
            default: bf16_rows_nb<8>(xb, w, yb, N, K, o0, o1, rb); break;
        }
    }
}
#endif

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_TGT __attribute__((target("amx-tile,amx-bf16")))
#define BF16_AMX_PREFETCH 2048
struct TileConfig { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };


/* 16 output rows from o0, all B input rows: acc [16, B] float32 = W[o0:o0+16] xt, where xt holds the input rows
   transposed in pairs (`bf16_pairs`). Two accumulator tiles, even and odd 32-column chunks, added at the end. */
AMX_TGT static void bf16_rows_amx(const uint16_t* xt, const uint16_t* w, float* acc, float* acc2, int B, int K,
                                  int o0) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = cfg.rows[3] = 16; cfg.colsb[0] = cfg.colsb[3] = (uint16_t)(4 * B);  /* accumulators [16, B] */
    cfg.rows[1] = cfg.rows[4] = 16; cfg.colsb[1] = cfg.colsb[4] = 64;                /* weights [16, 32] */
    cfg.rows[2] = cfg.rows[5] = 16; cfg.colsb[2] = cfg.colsb[5] = (uint16_t)(4 * B);  /* inputs [16 pairs, B] */
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(3);
    const uint16_t* wr = w + (size_t)o0 * K;
    const int chunks = K / 32;
    for (int c = 0; c < chunks; c += 2) {
        for (int r = 0; r < 16; ++r)
            _mm_prefetch((const char*)(wr + (size_t)r * K + 32 * c) + BF16_AMX_PREFETCH, _MM_HINT_T0);
        _tile_loadd(1, wr + 32 * c, 2 * K);
        _tile_loadd(2, xt + (size_t)c * 32 * B, 4 * B);
        _tile_dpbf16ps(0, 1, 2);
        if (c + 1 < chunks) {
            _tile_loadd(4, wr + 32 * (c + 1), 2 * K);
            _tile_loadd(5, xt + (size_t)(c + 1) * 32 * B, 4 * B);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, acc, 4 * B);
    _tile_stored(3, acc2, 4 * B);
    _tile_release();
}
#endif

/* AMX on this CPU, and the kernel's permission to use its tile data (Linux asks each process to request it) */
extern "C" int graphrt_bf16_has_amx(void) {
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : 0;
#else
    return 0;
#endif
}

struct Bf16Job {
    const uint16_t* x; const uint16_t* w; uint16_t* y; uint16_t* xe; int B, N, K, nc, x_row, path, silu;
    const uint16_t* nw; const uint16_t* residual; float r[16]; uint16_t* xt;
};

static void bf16_pairs(void* c, int begin, int end) {   /* per 32-column chunk: xt[c][p][b][e] = xe[b][32c + 2p + e] */
    Bf16Job& j = *(Bf16Job*)c;
    for (int t = begin; t < end; ++t)
        for (int p = 0; p < 16; ++p)
            for (int b = 0; b < j.B; ++b)
                for (int e = 0; e < 2; ++e)
                    j.xt[(((size_t)t * 16 + p) * j.B + b) * 2 + e] = j.xe[(size_t)b * j.K + 32 * t + 2 * p + e];
}

static void bf16_prep(void* c, int begin, int end) {   /* 128-column pieces of the input rows */
    Bf16Job& j = *(Bf16Job*)c;
    for (int t = begin; t < end; ++t)
        input_cols(j.x + (size_t)(t / j.nc) * j.x_row, j.xe + (size_t)(t / j.nc) * j.K, j.K, 128 * (t % j.nc),
                   128 * (t % j.nc) + 128, j.nw, j.r[t / j.nc], j.silu);
}

static void bf16_rows(void* c, int begin, int end) {   /* tasks of 16 output rows */
    Bf16Job& j = *(Bf16Job*)c;
    for (int t = begin; t < end; ++t) {
        int o0 = 16 * t, o1 = o0 + 16 < j.N ? o0 + 16 : j.N;
#if defined(__x86_64__)
        if (j.path == 2 && o1 - o0 == 16) {
            float acc[256], acc2[256];
            bf16_rows_amx(j.xt, j.w, acc, acc2, j.B, j.K, o0);
            for (int r = 0; r < 16; ++r)
                for (int b = 0; b < j.B; ++b) {
                    const size_t at = (size_t)b * j.N + o0 + r;
                    j.y[at] = out_bf16(acc[r * j.B + b] + acc2[r * j.B + b], j.residual, at);
                }
            continue;
        }
        if (j.path >= 1) { bf16_rows_avx512_all(j.xe, j.w, j.y, j.B, j.N, j.K, o0, o1, j.residual); continue; }
#endif
        bf16_rows_portable(j.xe, j.w, j.y, j.B, j.N, j.K, o0, o1, j.residual);
    }
}

/* x bf16 [B, x_row] (x_row = K, or 2K with silu), w bf16 [N, K] -> y bf16 [B, N]; scratch xe bf16 [B, K] (and
   xt, the same count, for AMX); nw / eps / silu / residual as in graphrt_int4_gemv. K % 128 == 0, B <= 16.
   path 2: AMX tiles (rows in tiles of 16; a last partial tile on the AVX512 path), 1: AVX512-BF16, 0: portable. */
extern "C" void graphrt_bf16_gemv(const uint16_t* x, const uint16_t* w, uint16_t* y, uint16_t* xe, int B, int N,
                                  int K, int threads, int path, const uint16_t* nw, float eps, int silu,
                                  const uint16_t* residual, uint16_t* xt) {
    Bf16Job j{x, w, y, xe, B, N, K, K / 128, silu ? 2 * K : K, path, silu, nw, residual, {0}, xt};
    for (int b = 0; b < B; ++b) j.r[b] = nw ? norm_scale(x + (size_t)b * j.x_row, K, eps) : 1.0f;
    pool_run(bf16_prep, &j, B * j.nc, threads);
    if (path == 2) pool_run(bf16_pairs, &j, K / 32, threads);
    pool_run(bf16_rows, &j, (N + 15) / 16, threads);
}
"""
