"""Int4 weight-only GEMV for a few decode rows (M = 1..4) over the "blocked" layout, as a CUDA kernel compiled at run
time with NVRTC (`torch.cuda._compile_kernel`: no compiler, no build step, no extension to install).

Why a second kernel beside int4_gemv.py's Triton one: at M == 1 a 4-bit GEMV issues about as many instructions
per weight byte as the GPU can retire, so the instruction count per weight decides whether it reaches HBM speed.
Here a weight costs two: a shift-and-mask per 4 codes puts each code q (0..15) at bits 3..6 of its byte, then one
byte permute per weight writes that byte under 0x3F, which is the float 0.5 + q / 32 exactly, and one FMA
accumulates x times it. The group's scale s and zero z are applied once per 16 weights:

    sum_k x[k] (q[n, k] - 8) = 32 * sum_k x[k] (0.5 + q[n, k] / 32) - 24 * sum_k x[k]
    y[n] = sum over 16-column runs c of  s[n, g(c)] * (that sum over c)  +  z[n, g(c)] * sum_{k in c} x[k]

in float32 (the value of x @ Int4.dense(parts, float32).T up to float32 rounding: the rearrangement costs a few
ulps of the 16-term sums, well inside the tests' 1e-5 for float32). Measured on the H100 (tools/int4_row_sweep.py,
docs/results/2026-11-26-h100-int4-row-sweep-b09dc0d.json): 48.4 us at 28672 x 8192 (2.58 TB/s) with 4 rows x 64
threads per block, against tinygemm's 60.8 and the Triton kernel's 109.7.

Work split: a block of T threads (T = 32..MAX_THREADS) owns ROWS consecutive rows and strides along K in
16-byte chunks (32 weights of one 64-column packing block): thread t reads chunks t, t + T, ... of every row, so a warp's loads
of 512 contiguous bytes per row are in flight together and x is loaded once (16-byte loads) for all ROWS rows.
With M input rows (a batch of up to 4, a speculative draft's two-token step) every weight load serves all M:
the weights are read once. Rows are reduced inside the block in a fixed order (warp shuffles, then the warps in turn): deterministic, so
graph replay == eager, bitwise. Needs N % ROWS == 0, K % 64 == 0 and 16-byte aligned x, w and scales; int4.py
falls back to the Triton kernel otherwise.
"""
from __future__ import annotations

import functools

import torch

ROWS = 4                    # rows per block (tools/int4_row_sweep.py: 4 beat 8 and 16 on the H100)
MAX_THREADS = 64            # threads per block (the sweep: 64 beat 128 at every 8B decode shape; up to 256)
MAX_INPUTS = 4              # input rows one launch takes (each weight load serves all of them)
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}

_SOURCE = r"""
#define XT __XT__
#define ROWS __ROWS__
#define MR __MR__
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

__device__ __forceinline__ void store(xt* out, float v) {
#if XT == 0
    unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); *out = h;
#elif XT == 1
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); *out = h;
#else
    *out = v;
#endif
}

__device__ __forceinline__ unsigned int word(const uint4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ float code(unsigned int bytes, unsigned int selector) {
    // byte `selector & 7` of `bytes` (q << 3, q a code 0..15) under 0x3F: the float 0.5 + q / 32, exact
    return __int_as_float(__byte_perm(bytes, 0x3F000000u, selector));
}

extern "C" __global__ void int4_gemv_row(const xt* __restrict__ x, const uint4* __restrict__ w,
                                         const unsigned int* __restrict__ sz, const xt* __restrict__ bias,
                                         const xt* __restrict__ residual, xt* __restrict__ out, int N, int K,
                                         int group, int has_bias, int has_residual) {
    // MR input rows x[m, :] (m < MR, row stride K) share every weight load; out[m, n] at m * N + n
    const int n0 = blockIdx.x * ROWS;
    const int chunks = K >> 5;                 // 16-byte chunks per row (32 weights)
    float acc[MR][ROWS];
    #pragma unroll
    for (int m = 0; m < MR; ++m)
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        uint4 q[ROWS];
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) q[r] = w[(unsigned long long)(n0 + r) * chunks + c];
        const int col = (c >> 1) * 64 + (c & 1) * 16;       // low nibbles: col .. col+15; high: col+32 ..
        const uint4* sz_lo = (const uint4*)(sz + (unsigned long long)(col / group) * N + n0);
        const uint4* sz_hi = (const uint4*)(sz + (unsigned long long)((col + 32) / group) * N + n0);
        uint4 s_lo[ROWS / 4], s_hi[ROWS / 4];
        #pragma unroll
        for (int i = 0; i < ROWS / 4; ++i) { s_lo[i] = sz_lo[i]; s_hi[i] = sz_hi[i]; }
        #pragma unroll
        for (int m = 0; m < MR; ++m) {
            float xl[16], xh[16];
            load16(x + (unsigned long long)m * K + col, xl);
            load16(x + (unsigned long long)m * K + col + 32, xh);
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
                const unsigned int wl = word(s_lo[r >> 2], r & 3), wh = word(s_hi[r >> 2], r & 3);
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
    __shared__ float partial[8][MR * ROWS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int m = 0; m < MR; ++m)
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = acc[m][r];
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
            if (lane == 0) partial[warp][m * ROWS + r] = v;
        }
    __syncthreads();
    if (threadIdx.x < MR * ROWS) {
        const int m = threadIdx.x / ROWS, r = threadIdx.x % ROWS;
        float v = partial[0][threadIdx.x];
        for (int i = 1; i < (int)(blockDim.x >> 5); ++i) v += partial[i][threadIdx.x];
        if (has_bias) v += to_f32(bias[n0 + r]);
        if (has_residual) v += to_f32(residual[(unsigned long long)m * N + n0 + r]);
        store(out + (unsigned long long)m * N + n0 + r, v);
    }
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, device_index: int, rows: int = ROWS, inputs: int = 1):
    major, minor = torch.cuda.get_device_capability(device_index)
    source = _SOURCE.replace("__XT__", str(_DTYPES[dtype])).replace("__ROWS__", str(rows)).replace("__MR__", str(inputs))
    with torch.cuda.device(device_index):
        try:
            return torch.cuda._compile_kernel(source, "int4_gemv_row", compute_capability=f"{major}{minor}")
        except TypeError:   # an older signature: (source, name) only
            return torch.cuda._compile_kernel(source, "int4_gemv_row")


@functools.lru_cache(maxsize=None)
def available(device_index: int = 0) -> bool:
    """True when the kernel compiles here (a CUDA device, NVRTC, and a torch with `torch.cuda._compile_kernel`)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        for dtype in _DTYPES:
            _kernel(dtype, device_index)
        return True
    except Exception:       # no NVRTC library, or an unsupported device: the Triton kernel serves instead
        return False


def supports(x: torch.Tensor, w: torch.Tensor, scales_and_zeros: torch.Tensor) -> bool:
    """Whether `int4_gemv_row` takes this call: 1..MAX_INPUTS rows on a CUDA device, N % ROWS == 0, K % 64 == 0."""
    n, kh = w.shape
    return (x.device.type == "cuda" and x.dtype in _DTYPES and x.numel() % (2 * kh) == 0
            and 1 <= x.numel() // (2 * kh) <= MAX_INPUTS and n % ROWS == 0
            and kh % 32 == 0 and scales_and_zeros.dtype == torch.bfloat16 and w.is_contiguous()
            and scales_and_zeros.is_contiguous() and x.is_contiguous()
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and scales_and_zeros.data_ptr() % 16 == 0
            and available(x.device.index or 0))


def int4_gemv_row(x: torch.Tensor, w: torch.Tensor, scales_and_zeros: torch.Tensor,
                  bias: torch.Tensor | None = None, *, rows: int = ROWS, max_threads: int = MAX_THREADS,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (1..MAX_INPUTS rows in all) times the blocked int4 matrix (w uint8 [N, K/2], scales_and_zeros bf16
    [K/G, N, 2]) transposed (+ bias [N]) (+ residual [..., N], contiguous, x's dtype: added in float32 before the
    one rounding) -> [..., N] in x's dtype. Call `supports` first."""
    n, kh = w.shape
    k = 2 * kh
    group = k // scales_and_zeros.shape[0]
    x1 = x.reshape(-1)
    inputs = x1.numel() // k
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    threads = min(max_threads, max(32, -(-(k // 32) // 32) * 32))
    kernel = _kernel(x.dtype, x.device.index or 0, rows, inputs)
    b = bias.contiguous() if bias is not None else x1
    res = residual if residual is not None else x1
    kernel(grid=(n // rows, 1, 1), block=(threads, 1, 1),
           args=[x1, w, scales_and_zeros, b, res, out, n, k, group, int(bias is not None), int(residual is not None)])
    return out
