"""Shared by the CPU kernel tests (test_int4_cpu.py, test_int8_cpu.py): the neighbours a fused product takes."""
import torch

from graphrt.models.fused import rms_norm_reference, silu_mul_reference
from graphrt.weights.formats import Weight, linear, linear_fused


def neighbour_cases(w: Weight, rows: int) -> list[tuple[dict, torch.Tensor]]:
    """(linear_fused's arguments with the input as "x", the same computed in steps apart) for w [n, k]: norm before
    the product, silu(gate) * up before it, the residual after, and silu with the residual."""
    n, k = w.shape
    x = torch.randn(rows, 1, k).bfloat16()
    nw = (torch.rand(k) + 0.5).bfloat16()
    res = torch.randn(rows, 1, n).bfloat16()
    gu = torch.randn(rows, 1, 2 * k).bfloat16()
    hidden = silu_mul_reference(gu[..., :k], gu[..., k:])
    return [(dict(x=x, norm=(nw, 1e-5)), linear(rms_norm_reference(x, nw, 1e-5), w)),
            (dict(x=gu, silu=True), linear(hidden, w)),
            (dict(x=x, residual=res), res + linear(x, w)),
            (dict(x=gu, silu=True, residual=res), res + linear(hidden, w))]


def check_neighbours(w: Weight, portable, same_bits_apart: bool = False) -> list[tuple[dict, torch.Tensor]]:
    """linear_fused on w with each neighbour at 1, 3 and 16 rows: close to the steps apart (the same bits where
    same_bits_apart and no residual rounds twice apart), and bitwise equal to portable(x, **neighbours), the
    kernel's lane-by-lane path. Returns the last row count's cases."""
    for rows in (1, 3, 16):
        cases = neighbour_cases(w, rows)
        for kw, apart in cases:
            kw = dict(kw)
            xin = kw.pop("x")
            fused = linear_fused(xin, w, **kw)
            assert fused is not None and fused.shape == apart.shape
            # the input rows round alike; the sum differs only by the residual's one rounding instead of two
            assert torch.allclose(fused.float(), apart.float(), rtol=2 ** -7, atol=2 ** -7 * apart.abs().max().item())
            if same_bits_apart and "residual" not in kw:
                assert torch.equal(fused.view(torch.int16), apart.view(torch.int16)), kw.keys()
            assert torch.equal(fused.view(torch.int16), portable(xin, **kw).view(torch.int16))
    return cases
