"""NVTX ranges are really emitted: an NVTX injection library (what Nsight Systems uses) records them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, torch
from graphrt import Runtime
rt = Runtime.from_pretrained(sys.argv[1], device=sys.argv[2], max_seq_len=64)
ids = torch.randint(3, 200, (1, 8))
rt.generate(ids, 6)
"""


def run_with_injection(tmp_path, model, device):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the NVTX injection library")
    lib = tmp_path / "libnvtx_inject.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(ROOT / "tools" / "nvtx_inject.c")], check=True)
    log = tmp_path / "nvtx.log"
    env = dict(os.environ, NVTX_INJECTION64_PATH=str(lib), NVTX_LOG_PATH=str(log))
    subprocess.run([sys.executable, "-c", SCRIPT, str(model), device], check=True, env=env, cwd=ROOT)
    lines = log.read_text().splitlines()
    pushes = [line.split(" ", 1)[1] for line in lines if line.startswith("push")]
    assert len(pushes) == sum(line.startswith("pop") for line in lines)  # balanced
    return pushes


def test_nvtx_ranges_cpu(make_ckpt, tmp_path):
    pushes = run_with_injection(tmp_path, make_ckpt(), "cpu")
    for name in ("graphrt.plan", "graphrt.load", "graphrt.prefill", "graphrt.step", "layer.0", "head"):
        assert name in pushes, name


@pytest.mark.gpu
def test_nvtx_ranges_gpu_graph(make_ckpt, tmp_path):
    pushes = run_with_injection(tmp_path, make_ckpt(), "cuda")
    for name in ("graphrt.plan", "graphrt.load", "graphrt.capture", "graphrt.prefill", "graphrt.step"):
        assert name in pushes, name
    assert pushes.count("graphrt.step") == 5  # one per replayed token after the first
