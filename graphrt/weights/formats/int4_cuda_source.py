"""CUDA source of int4_cuda.py's kernel (compiled at run time with NVRTC), with its compile-time switches:

    XT    activation type: 0 bfloat16, 1 float16, 2 float32
    ROWS  weight rows per block (4)
    MR    input rows (1..4): every weight load serves all of them
    NORM  prologue: the product's input is rms_norm(x) * nw = r * x * nw, r = 1 / sqrt(mean(x^2) + eps): the
          product runs on x * nw (float32, not rounded) while each block sums the squares of the x it reads, and
          the sum is scaled by r at the end (models/fused.rms_norm rounds x * r and then nw times it to the
          activation type: here neither is rounded, a difference of the order of that rounding)
    SILU  prologue: x is [MR, 2K] (a stacked gate | up product) and the input is round(round(silu(g)) * u), as
          models/fused.silu_mul rounds it (fast exp and division, as Triton's)
    ROPE  epilogue: the matrix is a stacked [q | k | v] projection of heads of D columns. A block owns the rows
          j, j + 1, j + D/2, j + D/2 + 1 of one head (two rotary pairs), rounds the products to XT as the plain
          linear would, then rotates q and k rows as models/fused.rope_append does (each product and the sum
          rounded to XT), writes q into `out` laid out [B, H, T, D] and k (rotated) and v into the caches at
          each input row's position. Input row m is token t of batch row b, m = b * T + t.
"""

SOURCE = r"""
#define XT __XT__
#define ROWS __ROWS__
#define MR __MR__
#define NORM __NORM__
#define SILU __SILU__
#define ROPE __ROPE__
#if XT == 2
typedef float xt;
#else
typedef unsigned short xt;
#endif

__device__ __forceinline__ float to_f32(xt v) {
#if XT == 0
    return __int_as_float(((unsigned int)v) << 16);
#elif XT == 1
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
#else
    return v;
#endif
}

__device__ __forceinline__ float half_lo(unsigned int u) {   // element 2j of a 32-bit word of two 16-bit values
#if XT == 0
    return __int_as_float(u << 16);
#else
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(u & 0xFFFFu))); return f;
#endif
}

__device__ __forceinline__ float half_hi(unsigned int u) {   // element 2j + 1
#if XT == 0
    return __int_as_float(u & 0xFFFF0000u);
#else
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(u >> 16))); return f;
#endif
}

__device__ __forceinline__ void load16(const xt* p, float* v) {   // 16 consecutive x values, 16-byte loads
#if XT == 2
    const float4* q = (const float4*)p;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 t = q[i];
        v[4 * i] = t.x; v[4 * i + 1] = t.y; v[4 * i + 2] = t.z; v[4 * i + 3] = t.w;
    }
#else
    const uint4* q = (const uint4*)p;
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint4 t = q[i];
        v[8 * i + 0] = half_lo(t.x); v[8 * i + 1] = half_hi(t.x);
        v[8 * i + 2] = half_lo(t.y); v[8 * i + 3] = half_hi(t.y);
        v[8 * i + 4] = half_lo(t.z); v[8 * i + 5] = half_hi(t.z);
        v[8 * i + 6] = half_lo(t.w); v[8 * i + 7] = half_hi(t.w);
    }
#endif
}

__device__ __forceinline__ xt to_xt(float v) {
#if XT == 0
    unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
#elif XT == 1
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
#else
    return v;
#endif
}

__device__ __forceinline__ float rnd(float v) { return to_f32(to_xt(v)); }   // rounded to XT, as a stored value

__device__ __forceinline__ unsigned int word(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ float code(unsigned int bytes, unsigned int selector) {
    // byte `selector & 7` of `bytes` (q << 3, q a code 0..15) under 0x3F: the float 0.5 + q / 32, exact
    return __int_as_float(__byte_perm(bytes, 0x3F000000u, selector));
}

__device__ __forceinline__ int row_of(int block, int r, int head_dim) {
#if ROPE
    // two rotary pairs of one head: j, j + 1 and their partners j + D/2, j + D/2 + 1
    const int half = head_dim >> 1, per_head = half >> 1;
    const int head = block / per_head, j = (block % per_head) * 2;
    return head * head_dim + (r >> 1) * half + j + (r & 1);
#else
    return block * ROWS + r;
#endif
}

// the 16 product inputs at columns col .. col + 15 of input row m (after the prologue)
__device__ __forceinline__ void inputs16(const xt* x, const xt* nw, float* ss, int m, int K, int col, float* v) {
#if SILU
    float g[16], u[16];
    load16(x + (unsigned long long)m * 2 * K + col, g);
    load16(x + (unsigned long long)m * 2 * K + K + col, u);
    #pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = rnd(rnd(__fdividef(g[i], 1.0f + __expf(-g[i]))) * u[i]);
#else
    load16(x + (unsigned long long)m * K + col, v);
#endif
#if NORM
    float w[16];
    load16(nw + col, w);
    #pragma unroll
    for (int i = 0; i < 16; ++i) { *ss = fmaf(v[i], v[i], *ss); v[i] *= w[i]; }
#endif
}

// the 16-byte chunk c (32 weights) of each of the block's rows, and the (scale, zero) pairs of its two groups
__device__ __forceinline__ void load_chunk(const uint4* __restrict__ w, const unsigned int* __restrict__ sz,
                                           const int* rows, int c, int chunks, int N, int group, uint4* q,
                                           unsigned int* s_lo, unsigned int* s_hi) {
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) q[r] = w[(unsigned long long)rows[r] * chunks + c];
    const int col = (c >> 1) * 64 + (c & 1) * 16;       // low nibbles: col .. col+15; high: col+32 ..
#if ROPE
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        s_lo[r] = sz[(unsigned long long)(col / group) * N + rows[r]];
        s_hi[r] = sz[(unsigned long long)((col + 32) / group) * N + rows[r]];
    }
#else
    const uint4* sz_lo = (const uint4*)(sz + (unsigned long long)(col / group) * N + rows[0]);
    const uint4* sz_hi = (const uint4*)(sz + (unsigned long long)((col + 32) / group) * N + rows[0]);
    #pragma unroll
    for (int i = 0; i < ROWS / 4; ++i) {
        const uint4 lo4 = sz_lo[i], hi4 = sz_hi[i];
        #pragma unroll
        for (int j = 0; j < 4; ++j) { s_lo[4 * i + j] = word(lo4, j); s_hi[4 * i + j] = word(hi4, j); }
    }
#endif
}

// acc[m][r] += the products of chunk c (weights q, group pairs s_lo / s_hi) with input row m's columns
__device__ __forceinline__ void accumulate(const xt* x, const xt* nw, float* ss, int K, int c, const uint4* q,
                                           const unsigned int* s_lo, const unsigned int* s_hi,
                                           float (*acc)[ROWS]) {
    const int col = (c >> 1) * 64 + (c & 1) * 16;
    #pragma unroll
    for (int m = 0; m < MR; ++m) {
        float xl[16], xh[16];
        inputs16(x, nw, ss + m, m, K, col, xl);
        inputs16(x, nw, ss + m, m, K, col + 32, xh);
        float sum_lo = 0.0f, sum_hi = 0.0f;
        #pragma unroll
        for (int i = 0; i < 16; ++i) { sum_lo += xl[i]; sum_hi += xh[i]; }
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float dot_lo = 0.0f, dot_hi = 0.0f;
            #pragma unroll
            for (int v = 0; v < 4; ++v) {
                const unsigned int bytes = word(q[r], v);
                const unsigned int lo = (bytes << 3) & 0x78787878u, hi = (bytes >> 1) & 0x78787878u;
                #pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const unsigned int sel = 0x7054u | (b << 8);
                    dot_lo = fmaf(xl[4 * v + b], code(lo, sel), dot_lo);
                    dot_hi = fmaf(xh[4 * v + b], code(hi, sel), dot_hi);
                }
            }
            const unsigned int wl = s_lo[r], wh = s_hi[r];
            // a bf16 pair: scale s in the low half, zero z in the high half.
            // sum x (q - 8) = 32 dot - 24 sum x, since dot = sum x (0.5 + q / 32)
            float a = acc[m][r];
            a = fmaf(__int_as_float(wl << 16), fmaf(32.0f, dot_lo, -24.0f * sum_lo), a);
            a = fmaf(__int_as_float(wl & 0xFFFF0000u), sum_lo, a);
            a = fmaf(__int_as_float(wh << 16), fmaf(32.0f, dot_hi, -24.0f * sum_hi), a);
            a = fmaf(__int_as_float(wh & 0xFFFF0000u), sum_hi, a);
            acc[m][r] = a;
        }
    }
}

extern "C" __global__ void int4_gemv_row(const xt* __restrict__ x, const uint4* __restrict__ w,
                                         const unsigned int* __restrict__ sz, const xt* __restrict__ bias,
                                         const xt* __restrict__ residual, xt* __restrict__ out, int N, int K,
                                         int group, int has_bias, int has_residual,
                                         const xt* __restrict__ nw, int eps_bits,
                                         const xt* __restrict__ cos, const xt* __restrict__ sin,
                                         const long long* __restrict__ positions, xt* __restrict__ k_cache,
                                         xt* __restrict__ v_cache, int k_b, int k_h, int v_b, int v_h,
                                         int T, int H, int HKV, int D) {
    // NORM: nw [K], eps (float bits). ROPE: cos, sin [MR, D]; positions [MR]; caches [maxB, Hkv, S, D] with the
    // strides (elements) of a batch row and a kv head
    // MR input rows x[m, :] (m < MR, row stride K) share every weight load; out[m, n] at m * N + n
    const int chunks = K >> 5;                 // 16-byte chunks per row (32 weights)
    int rows[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = row_of(blockIdx.x, r, D);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __shared__ float partial[8][MR * ROWS + MR];
    float ss[MR];                              // NORM: each row's sum of squares (this thread's columns)
    #pragma unroll
    for (int m = 0; m < MR; ++m) ss[m] = 0.0f;
    float acc[MR][ROWS];
    #pragma unroll
    for (int m = 0; m < MR; ++m)
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.0f;
    uint4 q[ROWS];
    unsigned int s_lo[ROWS], s_hi[ROWS];
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        // (loading the next chunk before this one's products was slower on the H100: tools/mlp_probe.py at e24f76f)
        load_chunk(w, sz, rows, c, chunks, N, group, q, s_lo, s_hi);
        accumulate(x, nw, ss, K, c, q, s_lo, s_hi, acc);
    }
    #pragma unroll
    for (int m = 0; m < MR; ++m)
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = acc[m][r];
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
            if (lane == 0) partial[warp][m * ROWS + r] = v;
        }
#if NORM
    #pragma unroll
    for (int m = 0; m < MR; ++m) {
        float v = ss[m];
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
        if (lane == 0) partial[warp][MR * ROWS + m] = v;
    }
#endif
    __syncthreads();
    float v = 0.0f;
    const int m = threadIdx.x / ROWS, r = threadIdx.x % ROWS;
    if (threadIdx.x < MR * ROWS) {
        v = partial[0][threadIdx.x];
        for (int i = 1; i < (int)(blockDim.x >> 5); ++i) v += partial[i][threadIdx.x];
#if NORM
        float sq = partial[0][MR * ROWS + m];
        for (int i = 1; i < (int)(blockDim.x >> 5); ++i) sq += partial[i][MR * ROWS + m];
        v *= 1.0f / __fsqrt_rn(sq / (float)K + __int_as_float(eps_bits));
#endif
        const int n = row_of(blockIdx.x, r, D);
        if (has_bias) v += to_f32(bias[n]);
        if (has_residual) v += to_f32(residual[(unsigned long long)m * N + n]);
    }
#if ROPE
    __shared__ float done[MR * ROWS];
    if (threadIdx.x < MR * ROWS) done[threadIdx.x] = rnd(v);     // the projection as the plain linear stores it
    __syncthreads();
    if (threadIdx.x < MR * ROWS) {
        const int n = row_of(blockIdx.x, r, D), head = n / D, d = n % D;
        const int b = m / T, t = m % T;
        const float x1 = done[m * ROWS + (r & 1)], x2 = done[m * ROWS + 2 + (r & 1)];   // the pair (j, j + D/2)
        const float c = to_f32(cos[m * D + d]), s = to_f32(sin[m * D + d]);
        const float turned = r < 2 ? rnd(rnd(x1 * c) + rnd(-x2 * s)) : rnd(rnd(x2 * c) + rnd(x1 * s));
        const long long pos = positions[m];
        if (head < H) {
            out[(((unsigned long long)b * H + head) * T + t) * D + d] = to_xt(turned);
        } else if (head < H + HKV) {
            k_cache[(long long)b * k_b + (long long)(head - H) * k_h + pos * D + d] = to_xt(turned);
        } else {
            v_cache[(long long)b * v_b + (long long)(head - H - HKV) * v_h + pos * D + d]
                = to_xt(done[threadIdx.x]);
        }
    }
#else
    if (threadIdx.x < MR * ROWS) out[(unsigned long long)m * N + row_of(blockIdx.x, r, D)] = to_xt(v);
#endif
}
"""
