"""C++ source of the CPU int8 GEMV (int8_cpu.py calls it; built into one library with int4_cpu_source.py, whose
helpers it uses, and run on the worker pool of cpu_pool_source.py): y = scale * (x W^T) for a row-major int8
W [N, K] with one float32 scale per output row (formats/int8.py), 1..16 input rows, the CPU lane's int8 product.

Why not ATen's `_weight_int8pack_mm`: it runs on OpenMP, and called from the CPU lane's serving thread (another
thread than the one whose OpenMP team the process already has) its team shares the CPUs with the first one's, and
libgomp then sleeps at every fork and barrier: an int8 MLP group took 530 us more in a captured step than called
directly (tools/lane_probe.py at 7853398), and the lane ran at 64 GB/s in the step against 87 calibrated.

The math, in float32 operations that both paths compute one for one (bitwise equal):
  - the input row is formed first as in the int4 kernel (`input_cols`: RMSNorm, or silu(gate) * up; in bfloat16),
    then widened to float32;
  - per output row and input row, 16 lanes: lane l += x[16c + l] * w[16c + l] for c = 0, 1, ... in order (each
    product is exact: 8 and 8 significant bits; so a fused multiply-add rounds like the add);
  - the lanes are added as a tree (tree16), multiplied by the row's scale, and rounded to bfloat16 once (with a
    residual r: bf16(r + y)).
The vector path holds 4 output rows x up to 4 input rows in registers; more input rows go 4 at a time.
"""

SOURCE = r"""
static void int8_rows_portable(const float* xf, const int8_t* w, const float* scale, uint16_t* y, int B, int N,
                               int K, int o0, int o1, const uint16_t* residual) {
    for (int o = o0; o < o1; ++o) {
        const int8_t* wr = w + (size_t)o * K;
        for (int b = 0; b < B; ++b) {
            const float* xb = xf + (size_t)b * K;
            float a[16] = {0};
            for (int c = 0; c < K / 16; ++c)
                for (int l = 0; l < 16; ++l) a[l] = a[l] + xb[16 * c + l] * (float)wr[16 * c + l];
            y[(size_t)b * N + o] = out_bf16(tree16(a) * scale[o], residual, (size_t)b * N + o);
        }
    }
}

#if defined(__x86_64__)
#define INT8_PREFETCH 1024   /* bytes ahead in each weight row */
template <int R, int NB>
TGT static void int8_tile(const float* xf, const int8_t* w, const float* scale, uint16_t* y, int N, int K, int o,
                          int b0, const uint16_t* residual) {
    __m512 a[R][NB];
    const int8_t* wr[R];
    for (int r = 0; r < R; ++r) {
        wr[r] = w + (size_t)(o + r) * K;
        for (int b = 0; b < NB; ++b) a[r][b] = _mm512_setzero_ps();
    }
    for (int c = 0; c < K / 64; ++c) {
        for (int r = 0; r < R; ++r) {
            _mm_prefetch((const char*)(wr[r] + 64 * c) + INT8_PREFETCH, _MM_HINT_T0);
            const __m512i wv = _mm512_loadu_si512((const void*)(wr[r] + 64 * c));
            for (int q = 0; q < 4; ++q) {
                const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(wv, q)));
                for (int b = 0; b < NB; ++b)
                    a[r][b] = _mm512_fmadd_ps(_mm512_loadu_ps(xf + (size_t)(b0 + b) * K + 64 * c + 16 * q), wf, a[r][b]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < NB; ++b) {
            float t[16];
            _mm512_storeu_ps(t, a[r][b]);
            const size_t at = (size_t)(b0 + b) * N + o + r;
            y[at] = out_bf16(tree16(t) * scale[o + r], residual, at);
        }
}

template <int R>
TGT static void int8_rows_r(const float* xf, const int8_t* w, const float* scale, uint16_t* y, int B, int N, int K,
                            int o, const uint16_t* residual) {
    for (int b0 = 0; b0 < B; b0 += 4) {
        switch (B - b0 < 4 ? B - b0 : 4) {
            case 1: int8_tile<R, 1>(xf, w, scale, y, N, K, o, b0, residual); break;
            case 2: int8_tile<R, 2>(xf, w, scale, y, N, K, o, b0, residual); break;
            case 3: int8_tile<R, 3>(xf, w, scale, y, N, K, o, b0, residual); break;
            default: int8_tile<R, 4>(xf, w, scale, y, N, K, o, b0, residual); break;
        }
    }
}
#endif

struct Int8Job {
    const uint16_t* x; const int8_t* w; const float* scale; uint16_t* y; uint16_t* xe; float* xf;
    int B, N, K, nc, x_row, path, silu; const uint16_t* nw; const uint16_t* residual; float r[16];
};

static void int8_prep(void* c, int begin, int end) {   /* 128-column pieces of the input rows, widened */
    Int8Job& j = *(Int8Job*)c;
    for (int t = begin; t < end; ++t) {
        const int b = t / j.nc, i0 = 128 * (t % j.nc);
        uint16_t* xe = j.xe + (size_t)b * j.K;
        input_cols(j.x + (size_t)b * j.x_row, xe, j.K, i0, i0 + 128, j.nw, j.r[b], j.silu);
        for (int i = i0; i < i0 + 128; ++i) j.xf[(size_t)b * j.K + i] = bf16_to_f32(xe[i]);
    }
}

static void int8_rows(void* c, int begin, int end) {   /* tasks of 16 output rows */
    Int8Job& j = *(Int8Job*)c;
    for (int t = begin; t < end; ++t) {
        int o0 = 16 * t, o1 = o0 + 16 < j.N ? o0 + 16 : j.N;
#if defined(__x86_64__)
        if (j.path == 1) {
            int o = o0;
            for (; o + 4 <= o1; o += 4) int8_rows_r<4>(j.xf, j.w, j.scale, j.y, j.B, j.N, j.K, o, j.residual);
            for (; o < o1; ++o) int8_rows_r<1>(j.xf, j.w, j.scale, j.y, j.B, j.N, j.K, o, j.residual);
            continue;
        }
#endif
        int8_rows_portable(j.xf, j.w, j.scale, j.y, j.B, j.N, j.K, o0, o1, j.residual);
    }
}

/* x bf16 [B, x_row] (x_row = K, or 2K with silu), w int8 [N, K], scale float32 [N] -> y bf16 [B, N]; scratch xe
   bf16 [B, K] and xf float32 [B, K]; nw / eps / silu / residual as in graphrt_int4_gemv. K % 128 == 0, B <= 16.
   path 1: AVX512, 0: portable. */
extern "C" void graphrt_int8_gemv(const uint16_t* x, const int8_t* w, const float* scale, uint16_t* y, uint16_t* xe,
                                  float* xf, int B, int N, int K, int threads, int path, const uint16_t* nw, float eps,
                                  int silu, const uint16_t* residual) {
    Int8Job j{x, w, scale, y, xe, xf, B, N, K, K / 128, silu ? 2 * K : K, path, silu, nw, residual, {0}};
    for (int b = 0; b < B; ++b) j.r[b] = nw ? norm_scale(x + (size_t)b * j.x_row, K, eps) : 1.0f;
    pool_run(int8_prep, &j, B * j.nc, threads);
    pool_run(int8_rows, &j, (N + 15) / 16, threads);
}
"""
