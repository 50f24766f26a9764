"""C++ source of the CPU bfloat16 GEMV (bf16_cpu.py calls it; built into one library with int4_cpu_source.py,
whose helpers it uses): y = x W^T for a row-major bf16 W [N, K] (the bytes the GPU streams), 1..16 input rows,
the CPU lane's product. oneDNN's packed kernel read these matrices from DRAM at 55-80 GB/s on the H100 host
(tools/cpu_gemv_probe.py, weights cycled so the cache cannot serve them), torch's int8 kernel at 105-130; this
kernel: an MLP group at 150 GB/s (tools/lane_probe.py).

The math, in float32 operations that both paths compute one for one (bitwise equal):
  - Per 32-column chunk c of a row, in order, 16 lanes: lane l += w[2l+1] x[2l+1], then += w[2l] x[2l] (float32
    adds, round to nearest even; products of two bfloat16 are exact): AVX512-BF16's vdpbf16ps, one accumulator per
    (output row, input row).
  - The 16 lanes are added as a tree (l + 8, l + 4, l + 2, l + 1), and the sum rounded to bfloat16 (with a
    residual r: bf16(r + y), one rounding).
  - The vector path holds a tile of R output rows x up to 8 input rows in registers (R = 4 up to 4 input rows,
    else 2): each weight vector loaded serves every input row and each input vector every output row of the tile,
    so 8 rows cost little more than 4 (they ran at half the rate when each group of 4 input rows re-read the
    weights).
  - The input row may be formed first, as in the int4 kernel (`input_cols`: RMSNorm, or silu(gate) * up).
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

struct Bf16Job {
    const uint16_t* x; const uint16_t* w; uint16_t* y; uint16_t* xe; int B, N, K, nc, x_row, path, silu;
    const uint16_t* nw; const uint16_t* residual; float r[16];
};

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
        if (j.path == 1) { bf16_rows_avx512_all(j.xe, j.w, j.y, j.B, j.N, j.K, o0, o1, j.residual); continue; }
#endif
        bf16_rows_portable(j.xe, j.w, j.y, j.B, j.N, j.K, o0, o1, j.residual);
    }
}

/* x bf16 [B, x_row] (x_row = K, or 2K with silu), w bf16 [N, K] -> y bf16 [B, N]; scratch xe bf16 [B, K];
   nw / eps / silu / residual as in graphrt_int4_gemv. K % 128 == 0, B <= 16. path 1: AVX512-BF16, 0: portable. */
extern "C" void graphrt_bf16_gemv(const uint16_t* x, const uint16_t* w, uint16_t* y, uint16_t* xe, int B, int N,
                                  int K, int threads, int path, const uint16_t* nw, float eps, int silu,
                                  const uint16_t* residual) {
    Bf16Job j{x, w, y, xe, B, N, K, K / 128, silu ? 2 * K : K, path, silu, nw, residual, {0}};
    for (int b = 0; b < B; ++b) j.r[b] = nw ? norm_scale(x + (size_t)b * j.x_row, K, eps) : 1.0f;
    pool_run(bf16_prep, &j, B * j.nc, threads);
    pool_run(bf16_rows, &j, (N + 15) / 16, threads);
}
"""
