"""Shared by the CPU kernel tests (test_int4_cpu.py, test_int8_cpu.py): the neighbours a fused product takes."""
import torch

from graphrt.models.fused import rms_norm_reference, silu_mul_reference
from graphrt.weights.formats import Weight, linear


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
