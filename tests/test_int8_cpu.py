"""graphrt's CPU int8 GEMV (weights/formats/int8_cpu.py), the CPU lane's int8 product: the AVX512 path bitwise
equal to the portable path, both near the float64 product of the format's own dequantized matrix, the same bits at
any thread count, the neighbours (norm, silu * up, residual) against the steps apart, and the format's CPU linear
going through it for the lane's groups only (for_cpu) and through ATen's kernel otherwise."""
import pytest
import torch

from graphrt.weights.formats import Int8, Weight, for_cpu, int4_cpu, int8_cpu, linear, linear_fused
from kernel_cases import check_neighbours

needs_kernel = pytest.mark.skipif(not int8_cpu.available(), reason=f"graphrt's CPU kernels (AVX512): "
                                  f"{int4_cpu.why_unavailable() or 'off'}")

# (out rows, in columns, input rows): out rows not a multiple of 4 or of 16, inputs past one 4-row tile
SHAPES = [(16, 128, 1), (52, 256, 3), (37, 384, 5), (64, 1024, 4), (40, 512, 16), (8, 14336, 2)]


def _matrix(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fmt = Int8(torch.bfloat16)
    return fmt, fmt.encode(torch.randn(n, k, generator=gen) * 0.05, "cpu")


def test_portable_path_matches_the_float64_product():
    if not int4_cpu.built():
        pytest.skip(f"no C++ toolchain: {int4_cpu.why_unavailable()}")
    for n, k, b in SHAPES:
        fmt, parts = _matrix(n, k)
        x = torch.randn(b, k).bfloat16()
        y = int8_cpu.int8_gemv(x, parts["w"], parts["scale"], portable=True)
        ref = x.double() @ fmt.dense(parts, torch.float64).t()
        assert torch.allclose(y.double(), ref, rtol=2 ** -8, atol=1e-4 * ref.abs().max().item()), (n, k, b)


@needs_kernel
def test_vector_path_is_bitwise_the_portable_path_at_any_thread_count():
    threads = torch.get_num_threads()
    try:
        for n, k, b in SHAPES:
            _, parts = _matrix(n, k, seed=n)
            x = torch.randn(2, b, k).bfloat16()[1]           # a view with an offset
            want = int8_cpu.int8_gemv(x, parts["w"], parts["scale"], portable=True)
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                got = int8_cpu.int8_gemv(x, parts["w"], parts["scale"])
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (n, k, b, t)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_the_lane_groups_go_through_the_kernel_others_through_aten():
    fmt, parts = _matrix(48, 256)
    lane = Weight(fmt, for_cpu({"m": Weight(fmt, parts, (48, 256))}, rows=4)["m"].parts, (48, 256))
    plain = Weight(fmt, parts, (48, 256))
    assert "gemv" in lane.parts and "gemv" not in plain.parts
    assert "gemv" not in for_cpu({"m": plain}, rows=int8_cpu.MAX_ROWS + 1)["m"].parts   # larger batches: ATen
    x = torch.randn(3, 1, 256).bfloat16()
    ours, aten = linear(x, lane), linear(x, plain)
    assert torch.equal(ours, int8_cpu.int8_gemv(x, parts["w"], parts["scale"]))
    assert torch.equal(aten, torch._weight_int8pack_mm(x.view(3, 256), parts["w"], parts["scale"].bfloat16()).view(3, 1, 48))
    assert torch.allclose(ours.float(), aten.float(), rtol=2 ** -6, atol=2 ** -7 * aten.abs().max().item())
    # what the kernel does not take goes to ATen: float32 rows, more rows than MAX_ROWS
    assert not int8_cpu.fusable(x.float(), parts["w"], parts["scale"])
    assert not int8_cpu.fusable(torch.randn(17, 256).bfloat16(), parts["w"], parts["scale"])
    assert linear(x.float(), lane).dtype == torch.float32


@needs_kernel
def test_fused_neighbours_match_the_steps_apart():
    """norm before the product, silu(gate) * up before it, the residual after (the MLP's three products on the lane)."""
    fmt, parts = _matrix(64, 512)
    w = Weight(fmt, {**parts, "gemv": torch.empty(0)}, (64, 512))
    cases = check_neighbours(w, lambda x, **kw: int8_cpu.int8_gemv(x, parts["w"], parts["scale"], portable=True, **kw),
                             same_bits_apart=True)
    (kw, _), (res_kw, _) = cases[0], cases[2]
    assert linear_fused(kw["x"], w, norm=kw["norm"], silu=True) is None
    assert linear_fused(res_kw["x"], Weight(fmt, parts, (64, 512)), residual=res_kw["residual"]) is None   # not the lane's
