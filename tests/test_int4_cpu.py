"""graphrt's CPU int4 kernel (weights/formats/int4_cpu.py): the AVX512-BF16 path against the portable path that
computes the same float32 operations lane by lane (bitwise), both against the float64 product of the format's
own dequantized matrix, and the format's CPU linear going through it."""
import time

import pytest
import torch

from graphrt.weights.formats import Int4, Weight, linear
from graphrt.weights.formats import int4_cpu
from graphrt.weights.formats.policy import quantization_policy

needs_kernel = pytest.mark.skipif(not int4_cpu.available(), reason=f"graphrt's int4 CPU kernel: "
                                  f"{int4_cpu.why_unavailable() or 'off'}")


def _matrix(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fmt = Int4(torch.bfloat16, group_size=group, packing="blocked")
    parts = fmt.encode(torch.randn(n, k, generator=gen) * 0.05, "cpu")
    return fmt, parts


SHAPES = [(16, 128, 128, 1), (48, 256, 128, 3), (32, 512, 256, 5), (40, 1024, 128, 4), (64, 4096, 128, 16),
          (16, 14336, 128, 2), (7, 384, 128, 1)]   # the last: fewer rows than one 16-row chunk


def test_portable_path_matches_the_float64_product():
    if not int4_cpu.built():
        pytest.skip(f"no C++ toolchain: {int4_cpu.why_unavailable()}")
    for n, k, g, b in SHAPES:
        fmt, parts = _matrix(n, k, g)
        x = torch.randn(b, k).bfloat16()
        y = int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"], portable=True)
        ref = x.double() @ fmt.dense(parts, torch.float64).t()
        # float32 sums, one bfloat16 rounding of the result: within 2^-8 of each value plus float32 noise
        assert torch.allclose(y.double(), ref, rtol=2 ** -8, atol=1e-4 * ref.abs().max().item()), (n, k, g, b)


@needs_kernel
def test_vector_path_is_bitwise_the_portable_path():
    torch.manual_seed(1)
    for n, k, g, b in SHAPES:
        _, parts = _matrix(n, k, g, seed=n)
        x = torch.randn(b, k).bfloat16() * 3
        vec = int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"])
        ref = int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"], portable=True)
        assert torch.equal(vec.view(torch.int16), ref.view(torch.int16)), (n, k, g, b)


@needs_kernel
def test_thread_count_does_not_change_a_bit():
    _, parts = _matrix(96, 1024, 128)
    x = torch.randn(2, 1024).bfloat16()
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, max(2, before)):
            torch.set_num_threads(t)
            outs.append(int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


@needs_kernel
def test_the_format_on_the_cpu_goes_through_the_kernel():
    policy = quantization_policy("int4", torch.bfloat16, "cpu")
    assert policy.matrix.packing == "blocked"
    fmt, parts = _matrix(64, 512, 128)
    w = Weight(fmt, parts, (64, 512))
    x = torch.randn(2, 3, 512).bfloat16()
    y = linear(x, w)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(6, 64), int4_cpu.int4_gemv(x.reshape(6, 512), parts["w"], parts["scales_and_zeros"]))
    # many rows (a prompt): the dequantized matrix and one GEMM, close to the kernel's rows
    xs = torch.randn(40, 512).bfloat16()
    ref = xs.double() @ fmt.dense(parts, torch.float64).t()
    assert torch.allclose(linear(xs, w).double(), ref, rtol=2 ** -6, atol=1e-2 * ref.abs().max().item())


def test_the_kernel_refuses_what_it_cannot_take():
    fmt, parts = _matrix(16, 128, 128)
    w, sz = parts["w"], parts["scales_and_zeros"]
    assert not int4_cpu.supports(torch.randn(1, 128), w, sz)                      # float32 activations
    assert not int4_cpu.supports(torch.randn(17, 128).bfloat16(), w, sz)          # more rows than a GEMV
    _, p64 = _matrix(16, 128, 64)
    assert not int4_cpu.supports(torch.randn(1, 128).bfloat16(), p64["w"], p64["scales_and_zeros"])   # groups of 64


@needs_kernel
def test_fused_neighbours_match_the_steps_apart():
    """norm before the product, silu(gate) * up before it, the residual after: against the steps apart, and the
    vector path bitwise equal to the portable one with each neighbour."""
    from graphrt.weights.formats import linear_fused
    from kernel_cases import check_neighbours
    fmt, parts = _matrix(64, 512, 128)
    w = Weight(fmt, parts, (64, 512))
    cases = check_neighbours(w, lambda x, **kw: int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"],
                                                                   portable=True, **kw))
    # what it does not take: both norm and silu, a bias, float32 rows
    x, nw, res = cases[0][0]["x"], cases[0][0]["norm"][0], cases[2][0]["residual"]
    assert linear_fused(x, w, norm=(nw, 1e-5), silu=True) is None
    assert linear_fused(x, w, torch.zeros(64).bfloat16(), residual=res) is None
    assert linear_fused(x.float(), w, residual=res) is None


# ---- the bf16 GEMV (bf16_cpu.py), built into the same library ------------------------------------------------
@needs_kernel
def test_bf16_gemv_vector_path_is_the_portable_path_and_near_float64():
    from graphrt.weights.formats import bf16_cpu
    from graphrt.models.fused import rms_norm_reference, silu_mul_reference
    gen = torch.Generator().manual_seed(3)
    # tiles of 4 output rows up to 4 input rows, else 2; odd counts leave tails of single rows
    for n, k, rows in [(16, 128, 1), (40, 512, 3), (64, 4096, 16), (7, 384, 2), (9, 256, 5), (33, 128, 8), (6, 256, 7),
                       (13, 128, 12)]:
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        x = torch.randn(rows, k, generator=gen).bfloat16()
        y = bf16_cpu.bf16_gemv(x, w)
        assert torch.equal(y.view(torch.int16), bf16_cpu.bf16_gemv(x, w, portable=True).view(torch.int16))
        ref = x.double() @ w.double().t()
        assert torch.allclose(y.double(), ref, rtol=2 ** -8, atol=1e-4 * ref.abs().max().item())
        nw, res = (torch.rand(k, generator=gen) + 0.5).bfloat16(), torch.randn(rows, n, generator=gen).bfloat16()
        gu = torch.randn(rows, 2 * k, generator=gen).bfloat16()
        for kw, apart in [(dict(norm=(nw, 1e-5)), bf16_cpu.bf16_gemv(rms_norm_reference(x, nw, 1e-5), w)),
                          (dict(silu=True, residual=res), res + bf16_cpu.bf16_gemv(silu_mul_reference(gu[:, :k], gu[:, k:]), w))]:
            xin = gu if kw.get("silu") else x
            fused = bf16_cpu.bf16_gemv(xin, w, **kw)
            assert torch.equal(fused.view(torch.int16), bf16_cpu.bf16_gemv(xin, w, portable=True, **kw).view(torch.int16))
            assert torch.allclose(fused.float(), apart.float(), rtol=2 ** -7, atol=2 ** -7 * apart.abs().max().item())
    assert not bf16_cpu.fusable(torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16())     # K % 128
    assert not bf16_cpu.fusable(torch.randn(17, 128).bfloat16(), torch.randn(8, 128).bfloat16())  # 17 rows


@needs_kernel
def test_the_worker_pool_serves_several_callers_and_team_sizes():
    """Two Python threads calling at once (the CPU lane's driver thread beside the main thread), with changing team
    sizes and spin times: every result is the one a lone call gives."""
    import threading
    _, parts = _matrix(256, 1024, 128)
    xs = [torch.randn(r, 1024).bfloat16() for r in (1, 2, 5)]
    want = [int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"]) for x in xs]
    bad = []

    def caller(threads: int, spin: int) -> None:
        torch.set_num_threads(threads)
        int4_cpu.set_spin(spin)
        for i in range(60):
            got = int4_cpu.int4_gemv(xs[i % 3], parts["w"], parts["scales_and_zeros"])
            if not torch.equal(got, want[i % 3]):
                bad.append(i)

    before = torch.get_num_threads()
    try:
        workers = [threading.Thread(target=caller, args=(t, s)) for t, s in ((1, 0), (3, 2000), (2, 50))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(before)
        int4_cpu.set_spin(50)
    assert not bad


@needs_kernel
def test_a_forked_child_gets_a_pool_of_its_own():
    """After fork the child has none of the parent's worker threads; its kernel calls must not wait for them."""
    import os
    _, parts = _matrix(64, 512, 128)
    x = torch.randn(1, 512).bfloat16()
    want = int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"])     # the parent's pool exists now
    pid = os.fork()
    if pid == 0:   # child: compute, compare, exit without pytest's teardown
        ok = torch.equal(int4_cpu.int4_gemv(x, parts["w"], parts["scales_and_zeros"]), want)
        os._exit(0 if ok else 1)
    deadline = time.time() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child's kernel call hung")
        time.sleep(0.05)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(not (int4_cpu.available() and __import__("graphrt.weights.formats.bf16_cpu",
                                                               fromlist=["x"]).amx_available()), reason="no AMX here")
def test_bf16_amx_tiles_match_float64_are_deterministic_and_batch_invariant():
    """The AMX path (2+ rows where AMX runs): near the float64 product, the same bits whatever the thread count, each
    row's result independent of the other rows, and the neighbours as the steps apart. Rows in tiles of 16, a last
    partial tile on the AVX512 path (n = 40, 33)."""
    from graphrt.weights.formats import bf16_cpu
    from graphrt.models.fused import rms_norm_reference, silu_mul_reference
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    for n, k, rows in [(48, 256, 2), (40, 128, 5), (33, 512, 8), (64, 4096, 16)]:
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        x = torch.randn(rows, k, generator=gen).bfloat16()
        y = bf16_cpu.bf16_gemv(x, w, amx=True)
        ref = x.double() @ w.double().t()
        assert torch.allclose(y.double(), ref, rtol=2 ** -8, atol=1e-4 * ref.abs().max().item())
        torch.set_num_threads(1)
        try:
            assert torch.equal(y.view(torch.int16), bf16_cpu.bf16_gemv(x, w, amx=True).view(torch.int16))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(y[1:2].view(torch.int16), bf16_cpu.bf16_gemv(x[1:2], w, amx=True).view(torch.int16))
        nw, res = (torch.rand(k, generator=gen) + 0.5).bfloat16(), torch.randn(rows, n, generator=gen).bfloat16()
        gu = torch.randn(rows, 2 * k, generator=gen).bfloat16()
        normed = bf16_cpu.bf16_gemv(x, w, norm=(nw, 1e-5), amx=True)
        assert torch.equal(normed.view(torch.int16),
                           bf16_cpu.bf16_gemv(rms_norm_reference(x, nw, 1e-5), w, amx=True).view(torch.int16))
        fused = bf16_cpu.bf16_gemv(gu, w, silu=True, residual=res, amx=True)
        apart = res + bf16_cpu.bf16_gemv(silu_mul_reference(gu[:, :k], gu[:, k:]), w, amx=True)
        assert torch.allclose(fused.float(), apart.float(), rtol=2 ** -7, atol=2 ** -7 * apart.abs().max().item())
