"""Pre-quantized FP8 checkpoints (compressed-tensors layout): loaded as stored, equal to a float model
holding the dequantized weights, streamed == resident, and clear errors for what cannot load."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphrt import CheckpointError, ConfigError, Runtime
from graphrt.weights.formats.fp8 import FP8
from graphrt.weights.synthetic import fp8_compressed_tensors, make_config, random_tensors, write_checkpoint

CFG = dict(arch="LlamaForCausalLM", hidden=64, intermediate=160, layers=4, heads=4, kv_heads=2, vocab=256)


def fp8_checkpoint(tmp_path, strategy="channel", shards=1):
    cfg = make_config(**CFG)
    cfg, tensors = fp8_compressed_tensors(cfg, random_tensors(cfg, 3), strategy)
    return write_checkpoint(tmp_path / f"fp8-{strategy}-{shards}", cfg, tensors, shards)


@pytest.mark.parametrize("strategy,shards", [("channel", 1), ("tensor", 1), ("channel", 3)])
def test_fp8_checkpoint_equals_its_dequantized_float_model(tmp_path, strategy, shards):
    path = fp8_checkpoint(tmp_path, strategy, shards)
    rt = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, max_batch_size=2)
    formats = {name: t.format for g in rt.placement.groups for t in g.tensors if t.is_matrix
               for name in t.checkpoint_names}
    assert isinstance(formats["model.layers.0.mlp.up_proj.weight"], FP8)
    assert not isinstance(formats["lm_head.weight"], FP8)  # in the checkpoint's ignore list
    # the reference: every FP8 weight dequantized (weight * weight_scale) in float32
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    ref = {n: (w.float() * tensors[n.removesuffix("weight") + "weight_scale"].float().view(-1, 1)
               if w.dtype == torch.float8_e4m3fn else w) for n, w in tensors.items() if not n.endswith("_scale")}
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file(ref, str(ref_dir / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    want = Runtime.from_pretrained(ref_dir, device="cpu", max_seq_len=64, max_batch_size=2)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    got, expect = rt.logits(ids), want.logits(ids)
    assert ((got - expect).norm() / expect.norm()).item() < 1e-6
    assert torch.equal(rt.generate(ids, 16), want.generate(ids, 16))


def test_fp8_checkpoint_streamed_equals_resident(tmp_path):
    path = fp8_checkpoint(tmp_path)
    resident = Runtime.from_pretrained(path, device="cpu", max_seq_len=64)
    slot = max(g.nbytes for g in resident.placement.groups)
    fixed = sum(resident.placement.memory.values()) - resident.placement.memory["weights"]
    streamed = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, gpu_budget=fixed + 2 * slot,
                                       ring_depth=2, poison_freed_slots=True)
    assert streamed.placement.streamed
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(streamed.logits(ids), resident.logits(ids))


def test_fp8_checkpoint_refuses_quantization_on_load(tmp_path):
    with pytest.raises(ConfigError, match="already quantized"):
        Runtime.from_pretrained(fp8_checkpoint(tmp_path), device="cpu", quantization="int4")


@pytest.mark.parametrize("change,match", [
    ({"num_bits": 4, "type": "int", "strategy": "group"}, "not supported"),
    ({"strategy": "block"}, "not supported"),
])
def test_unsupported_schemes_are_named(tmp_path, change, match):
    path = fp8_checkpoint(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as e:
        Runtime.from_pretrained(path, device="cpu")
    assert "config.json" in str(e.value) and "quantization='fp8'" in str(e.value)


def test_other_quant_methods_and_missing_scales(tmp_path):
    path = fp8_checkpoint(tmp_path)
    bad = tmp_path / "awq"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="awq"):
        Runtime.from_pretrained(bad, device="cpu")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_proj.weight_scale"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="weight_scale"):
        Runtime.from_pretrained(path, device="cpu")
