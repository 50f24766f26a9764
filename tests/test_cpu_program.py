"""CPU programs (weights/formats/cpu_program.py): a lane group's host function recorded as graphrt's kernel calls and
run in C. A recorded MLP (whole, or a split MLP's rows; bf16, int8, int4; 1 and 4 rows) writes exactly what the
Python function returns; functions that do anything else are refused; the serving loop runs programs itself, logs
them in its trace and hands other keys to Python."""
import ctypes
import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphrt.config import ModelConfig
from graphrt.models import llama
from graphrt.plan.calibrate import lane_runs, random_buffer
from graphrt.weights.formats import cpu_program, for_cpu, int4_cpu, linear
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.layout import mlp_parts, model_groups

pytestmark = pytest.mark.skipif(not int4_cpu.available(),
                                reason=f"graphrt's CPU kernels do not run here: {int4_cpu.why_unavailable()}")
CFG = dataclasses.replace(ModelConfig.from_file(Path(__file__).parent.parent / "tools" / "configs" / "llama-3.1-8b.json"),
                          hidden_size=256, intermediate_size=512)


def mlp(fmt: str, part: bool) -> dict:
    """The CPU lane's views of an MLP group (part: the CPU rows of a split MLP, 256 of 512) in format fmt."""
    policy = quantization_policy(None if fmt == "bf16" else fmt, torch.bfloat16, torch.device("cpu"))
    g = (mlp_parts(CFG, 0, policy, 256)[1] if part
         else next(x for x in model_groups(CFG, policy, "attn_mlp") if x.kind == "mlp"))
    return for_cpu(g.views(random_buffer(g)), 4)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("part", [False, True])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_a_recorded_mlp_runs_in_c_and_writes_what_python_returns(fmt, part, rows):
    w = mlp(fmt, part)
    fn = (lambda v: llama.mlp_rows(v, w)) if part else (lambda v: llama.mlp_forward(v, w, CFG))
    x = torch.randn(rows, 1, CFG.hidden_size).bfloat16()
    y = torch.zeros_like(x)
    program = cpu_program.record(fn, x, y, threads=2)
    assert program is not None and [c.name for c in program.calls][-1] == "copy"
    for _ in range(2):   # new inputs in x's memory: the program reads them there
        x.copy_(torch.randn_like(x))
        y.zero_()
        program.run()
        with torch.inference_mode():
            want = fn(x)
        assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    program.drop()
    program.run()   # dropped: nothing runs
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))


def test_functions_that_are_not_chains_of_kernel_calls_are_refused():
    w = mlp("bf16", part=True)
    x, other = torch.randn(1, 1, CFG.hidden_size).bfloat16(), torch.randn(1, 1, CFG.hidden_size).bfloat16()
    y = torch.empty_like(x)
    refused = {
        "a torch op after the kernels": lambda v: llama.mlp_rows(v, w) + 1,
        "an input that is not x": lambda v: llama.mlp_rows(other, w),
        "an earlier call's result": lambda v: [llama.mlp_rows(v, w), llama.mlp_rows(v, w)][0],
        "a torch op between the kernels": lambda v: linear(linear(v, w["gate_up"])[..., :256] * 2, w["down"]),
        "ATen's product": lambda v: F.linear(v, torch.randn(CFG.hidden_size, CFG.hidden_size).bfloat16()),
        "no kernel at all": lambda v: v * 2,
    }
    for why, fn in refused.items():
        assert cpu_program.record(fn, x, y, threads=2) is None, why
    assert cpu_program.record(lambda v: llama.mlp_rows(v, w), x, y, threads=2) is not None


def test_the_serving_loop_runs_programs_and_hands_other_keys_to_python():
    lib = int4_cpu.library()
    w = mlp("int4", part=False)
    x = torch.randn(1, 1, CFG.hidden_size).bfloat16()
    y = torch.zeros_like(x)
    program = cpu_program.record(lambda v: llama.mlp_forward(v, w, CFG), x, y, threads=2)
    flags = torch.zeros(4, dtype=torch.int32)        # request, answer, timeout, stop
    trace = torch.zeros(2 + 2 * 8, dtype=torch.int64)
    trace[0] = 8                                     # capacity: log up to 8 runs
    ptr = ctypes.c_void_p(flags.data_ptr())
    returned = []
    server = threading.Thread(target=lambda: returned.append(
        lib.graphrt_lane_serve(ptr, 1000, 50, ctypes.c_void_p(trace.data_ptr()))))
    server.start()

    def answered(key: int) -> bool:
        deadline = time.monotonic() + 5
        while int(flags[1]) != key and time.monotonic() < deadline:
            time.sleep(0.001)
        return int(flags[1]) == key
    for round_ in range(3):
        x.copy_(torch.randn_like(x))
        flags[0] = program.key                       # what a post kernel writes
        assert answered(program.key), round_
        with torch.inference_mode():
            assert torch.equal(y, llama.mlp_forward(x, w, CFG))
        flags[1] = 0                                 # what the wait kernel does
    assert int(trace[1]) == 3 and server.is_alive()
    spans = trace[2:8].view(torch.float64).view(3, 2)
    assert bool((spans[:, 1] >= spans[:, 0]).all()) and abs(spans[0, 0].item() - time.perf_counter()) < 60
    other = cpu_program.next_key()                   # no program: Python's
    flags[0] = other
    server.join(5)
    assert not server.is_alive() and returned == [other] and int(flags[1]) == 0


def test_the_calibration_times_the_programs_the_lane_runs():
    groups = [mlp("bf16", part=False), mlp("int8", part=True)]
    x = torch.randn(1, 1, CFG.hidden_size).bfloat16()
    runs = lane_runs(x, groups[:1], CFG) + lane_runs(x, groups[1:])
    assert all(getattr(r, "__self__", None).__class__ is cpu_program.Program for r in runs)
    for r in runs:
        r()
