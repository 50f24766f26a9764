"""Bad checkpoints and options get clear errors that name the problem."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphrt import CheckpointError, ConfigError, Runtime


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        Runtime.from_pretrained(d, device="cpu")


def test_unsupported_architecture(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        Runtime.from_pretrained(d, device="cpu")


def test_missing_tensor_is_named(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "m")
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        Runtime.from_pretrained(d, device="cpu")


def test_wrong_shape_names_expected_and_found(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj.weight' has shape \[48, 64\], expected \[32, 64\]"):
        Runtime.from_pretrained(d, device="cpu")


def test_truncated_file(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Runtime.from_pretrained(d, device="cpu")


def test_corrupt_header(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "m")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        Runtime.from_pretrained(d, device="cpu")


def test_index_names_missing_shard(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt("sharded", shards=2), tmp_path / "m")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Runtime.from_pretrained(d, device="cpu")


def test_unsupported_dtype(make_ckpt, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.float64)
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="F64"):
        Runtime.from_pretrained(d, device="cpu")


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Runtime.from_pretrained(tmp_path / "nope", device="cpu")


def test_unknown_option_and_bad_values(make_ckpt):
    with pytest.raises(ConfigError, match="unknown option"):
        Runtime.from_pretrained(make_ckpt(), device="cpu", ring_dept=3)
    with pytest.raises(ConfigError, match="ring_depth must be >= 2"):
        Runtime.from_pretrained(make_ckpt(), device="cpu", ring_depth=1)
    with pytest.raises(ConfigError, match="cannot read"):
        Runtime.from_pretrained(make_ckpt(), device="cpu", gpu_budget="lots")
    with pytest.raises(ConfigError, match="copy_mode must be 'memcpy' or 'kernel', got 'dma'"):
        Runtime.from_pretrained(make_ckpt(), device="cpu", copy_mode="dma")
    # on the CPU nothing is copied to a GPU: the kernel mode is accepted and streamed groups are plain copies
    from test_cpu_lane import half_budget
    path = make_ckpt(layers=12)
    budget = half_budget(Runtime.from_pretrained(path, device="cpu", gpu_budget=1 << 40, prefill_chunk=32).placement)
    rt = Runtime.from_pretrained(path, device="cpu", copy_mode="kernel", gpu_budget=budget, prefill_chunk=32)
    assert rt.placement.streamed and not rt.engine.store.copy_kernel
    assert torch.equal(rt.logits(torch.tensor([[5, 6, 7]])),
                       Runtime.from_pretrained(path, device="cpu").logits(torch.tensor([[5, 6, 7]])))


def test_sequence_and_batch_limits(make_ckpt):
    rt = Runtime.from_pretrained(make_ckpt(), device="cpu", max_batch_size=2, max_seq_len=32)
    with pytest.raises(ConfigError, match="exceeds max_seq_len=32"):
        rt.generate(torch.ones(1, 30, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ConfigError, match="exceeds max_batch_size=2"):
        rt.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)


def test_cuda_requested_without_cuda(make_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Runtime.from_pretrained(make_ckpt(), device="cuda")


def test_failed_conversion_leaves_nothing(tmp_path):
    from graphrt.default_model import convert_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    out = tmp_path / "out"
    with pytest.raises(Exception):
        convert_gguf(bad, out)
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
