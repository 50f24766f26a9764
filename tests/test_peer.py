"""The llama.cpp peer (graphrt.bench.peer) on the CPU, without llama.cpp: the GGUF it writes is the same model as
the safetensors checkpoint (graphrt's own GGUF reader gets bit-identical F16 weights and the same logits), its
metadata and stand-in tokenizer are what llama.cpp loads, the parsers read captured llama.cpp outputs, and
run_peer reports failures (missing binaries, a crashing tool) instead of raising."""
import json
import math
import os
import re
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import graphrt.bench.peer as peer
from graphrt.config import ModelConfig
from graphrt.runtime import Runtime
from graphrt.weights.gguf_source import GGUFCheckpoint, unpermute_rows
from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint

# `llama-bench -o json -p 0 -n 16` of the CPU build (llama-cpp-python 0.3.36's llama.cpp), trimmed
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "unknown", "build_number": 0, "cpu_info": "Intel(R) Xeon(R) Processor", "gpu_info": "",
    "backends": "CPU", "model_filename": "/tmp/peer-small/model-gguf/model.F16.gguf", "model_type": "llama ?B F16",
    "model_size": 5252096, "model_n_params": 2623744, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
    "type_k": "f16", "type_v": "f16", "n_gpu_layers": 0, "flash_attn": 1, "tensor_buft_overrides": "none",
    "n_prompt": 0, "n_gen": 16, "n_depth": 0, "test_time": "2026-11-25T21:15:15Z",
    "avg_ns": 4660485, "stddev_ns": 781536, "avg_ts": 3482.079532, "stddev_ts": 583.924943,
    "samples_ns": [ 5213115, 4107855 ], "samples_ts": [ 3069.18, 3894.98 ]
  }
]
"""
# llama-batched-bench -npp 128 -ntg 32 -npl 1,4 (stdout and stderr together, as the peer reads it)
BATCHED_TEXT = r"""
0.00.017.734 W llama_model_loader: tensor overrides to CPU are used with mmap enabled - consider using --load-mode none
llama_batched_bench: n_kv_max = 1024, n_batch = 2048, n_ubatch = 512, flash_attn = 1, is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = 0, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |     32 |    1 |    160 |    0.011 | 11734.51 |    0.010 |  3073.97 |    0.021 |  7505.39 |
|   128 |     32 |    4 |    640 |    0.026 | 19745.47 |    0.025 |  5041.55 |    0.051 | 12471.01 |

"""


def checkpoint(root: Path, name: str, **kw) -> Path:
    cfg = make_config(**dict(PRESETS["tiny-llama"], **kw))
    return write_checkpoint(root / name, cfg, random_tensors(cfg, seed=3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer")
    model = checkpoint(root, "tiny")
    return model, peer.write_gguf(model, root / "tiny.F16.gguf")


def f16(w: torch.Tensor) -> torch.Tensor:
    """What the peer's GGUF holds: matrices rounded to F16, vectors F32."""
    return w.half().float() if w.dim() == 2 else w


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    return Runtime.from_pretrained(path, device="cpu", dtype="float32", max_batch_size=ids.shape[0]).logits(ids)


def test_gguf_weights_are_the_checkpoints_in_f16(tiny):
    model, path = tiny
    src, got = dict(random_tensors(json.loads((model / "config.json").read_text()), seed=3)), GGUFCheckpoint(path)
    assert got.config.num_layers == 2 and got.config.vocab_size == 256
    for name, w in src.items():
        assert torch.equal(got.dequantized(name), f16(w)), name  # names and Q/K row order, bit for bit


def test_gguf_logits_match_the_checkpoint(tiny, tmp_path):
    model, path = tiny
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, got = logits(model, ids), logits(path, ids)
    assert (got - ref).abs().max() <= 2e-3 * ref.abs().max()  # F16 rounding of the weights only
    cfg = json.loads((model / "config.json").read_text())  # the same weights rounded to F16: metadata exact
    rounded = write_checkpoint(tmp_path / "f16", cfg, {k: f16(v) for k, v in random_tensors(cfg, 3).items()})
    torch.testing.assert_close(got, logits(rounded, ids), rtol=1e-5, atol=1e-5)


def test_unpermuted_file_is_caught(tiny, tmp_path, monkeypatch):
    """The logits comparison above fails for a file written without llama.cpp's Q/K permutation."""
    model, _ = tiny
    monkeypatch.setattr(peer, "permute_rows", lambda rows, heads: rows)
    bad = peer.write_gguf(model, tmp_path / "bad.gguf")
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    assert (logits(bad, ids) - ref).abs().max() > 0.05 * ref.abs().max()


def test_permute_rows_is_llama_cpps_and_inverts_unpermute():
    for rows, heads in ((64, 4), (32, 1), (48, 3)):
        w = torch.randn(rows, 5)
        conv = w.numpy().reshape(heads, 2, rows // heads // 2, 5).swapaxes(1, 2).reshape(rows, 5)  # convert_hf_to_gguf
        assert np.array_equal(peer.permute_rows(w, heads).numpy(), conv)
        assert torch.equal(unpermute_rows(peer.permute_rows(w, heads), heads), w)
        assert not torch.equal(peer.permute_rows(w, heads), w)


def test_metadata_tokenizer_and_types(tiny):
    _, path = tiny
    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items()}
    want = {"general.architecture": "llama", "llama.context_length": 4096, "llama.embedding_length": 64,
            "llama.block_count": 2, "llama.feed_forward_length": 160, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 256,
            "general.file_type": 1, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert {k: f[k] for k in want} == want
    assert f["llama.rope.freq_base"] == 10000.0 and f["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-5)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(set(tokens)) == 256 and types[1] == types[2] == 3 and f["tokenizer.ggml.merges"]
    assert "Ċ" in tokens  # the newline byte, which llama.cpp looks up when it loads a BPE vocab
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == kinds["output.weight"] == "F16"
    assert kinds["blk.1.ffn_norm.weight"] == kinds["output_norm.weight"] == "F32" and len(kinds) == 2 * 9 + 3


def test_stand_in_vocab_sizes():
    assert len(peer.gpt2_byte_tokens()) == len(set(peer.gpt2_byte_tokens())) == 256
    assert peer.gpt2_byte_tokens()[10] == "Ċ" and peer.gpt2_byte_tokens()[32] == "Ġ" and peer.gpt2_byte_tokens()[65] == "A"
    for size, bos, eos in ((256, 1, 2), (300, 128000, 2), (100000, 0, None)):
        tokens, types, merges = peer.stand_in_vocab(size, bos, eos)
        assert len(tokens) == len(set(tokens)) == len(types) == size and merges
        assert [types[i] for i in (bos, eos) if i is not None and i < size] == [3] * sum(
            i is not None and i < size for i in (bos, eos))


def test_llama3_rope_freqs_tensor(tmp_path):
    model = checkpoint(tmp_path, "l3", rope="llama3", theta=500000.0, hidden=128, heads=2, kv_heads=1)
    r = gguf.GGUFReader(str(peer.write_gguf(model, tmp_path / "l3.gguf")))
    got = np.asarray(next(t for t in r.tensors if t.name == "rope_freqs.weight").data)
    cfg = ModelConfig.from_file(model)
    s, dim = cfg.rope_scaling, cfg.head_dim  # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors
    low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], \
        s["original_max_position_embeddings"] / s["high_freq_factor"]
    want = []
    for freq in 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / freq
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
            (s["high_freq_factor"] - s["low_freq_factor"])
        want.append(1 if wavelen < high else s["factor"] if wavelen > low else 1 / ((1 - smooth) / s["factor"] + smooth))
    assert got.shape == (dim // 2,) and len(set(np.round(got, 3))) > 2  # the bands are all crossed
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert peer.rope_freq_factors(ModelConfig.from_file(checkpoint(tmp_path, "plain"))) is None


def test_parsers_on_captured_output():
    rec = peer.parse_llama_bench_json("main: some log line\n" + LLAMA_BENCH_JSON)
    assert len(rec) == 1 and rec[0]["n_gen"] == 16 and rec[0]["avg_ts"] == pytest.approx(3482.079532)
    rows = peer.parse_batched_bench(BATCHED_TEXT)
    assert [(r["b"], r["n_kv"]) for r in rows] == [(1, 160), (4, 640)]
    assert rows[1]["s_tg_tps"] == pytest.approx(5041.55) and rows[0]["s_pp_tps"] == pytest.approx(11734.51)
    assert rows[1]["t_s"] == pytest.approx(0.051) and rows[0]["pp"] == 128 and rows[0]["tg"] == 32
    assert peer.parse_batched_bench("error: unable to load model\n") == []
    with pytest.raises(ValueError):
        peer.parse_llama_bench_json("error: failed to load model")


def test_host_layers_pattern():
    value = peer.host_layers_pattern(3)
    assert value == r"blk\.(0|1|2)\.=CPU" and "," not in value
    pattern = re.compile(value.rsplit("=", 1)[0])
    hits = [n for n in ("blk.0.attn_q.weight", "blk.2.ffn_down.weight", "blk.3.attn_q.weight", "blk.10.ffn_up.weight",
                        "blk.21.attn_k.weight", "token_embd.weight") if pattern.search(n)]
    assert hits == ["blk.0.attn_q.weight", "blk.2.ffn_down.weight"]


def test_run_peer_without_binaries_reports(tmp_path):
    res = peer.run_peer(tmp_path / "no-model", tmp_path / "out", tmp_path / "no-bin", threads=1, host_layers=2)
    assert res["runs"] == [] and "llama.cpp binaries missing" in res["errors"][0]
    assert json.loads((tmp_path / "out" / "peer.json").read_text())["errors"] == res["errors"]
    assert "Errors:" in (tmp_path / "out" / "peer.md").read_text()


def fake_tools(bin_dir: Path, crash_without_repack: bool) -> None:
    """Shell stand-ins for the three tools that print the captured outputs; llama-bench dies of SIGSEGV unless
    given --repack 0 when `crash_without_repack` (the AMX failure the peer retries around)."""
    bin_dir.mkdir()
    crash = 'case "$*" in *"--repack 0"*) ;; *) kill -SEGV $$ ;; esac\n' if crash_without_repack else ""
    scripts = {"llama-quantize": 'cp "$1" "$2"\n',
               "llama-bench": crash + f"cat <<'EOF'\n{LLAMA_BENCH_JSON}EOF\n",
               "llama-batched-bench": f"cat <<'EOF'\n{BATCHED_TEXT}EOF\n"}
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        os.chmod(bin_dir / name, stat.S_IRWXU)


@pytest.mark.parametrize("crash", [False, True])
def test_run_peer_pipeline_with_stand_in_tools(tiny, tmp_path, crash):
    model, _ = tiny
    fake_tools(tmp_path / "bin", crash)
    res = peer.run_peer(model, tmp_path / "out", tmp_path / "bin", threads=2, host_layers=1, ngl=0,
                        gguf_dir=tmp_path / "gguf", batched_npl="1,4", reps=1, timeout=60)
    assert res["errors"] == [] and set(res["files"]) == {"F16", "Q8_0", "Q4_K_M"}
    assert [(r["format"], r["placement"], r["test"]) for r in res["runs"][:4]] == [
        ("F16", "gpu", "decode"), ("F16", "gpu", "prefill"), ("F16", "split", "decode"), ("F16", "split", "prefill")]
    assert all(r["tokens_per_s"] == pytest.approx(3482.079532) for r in res["runs"]) and len(res["runs"]) == 12
    assert all(("first_error" in r) == crash and ("--repack" in r["cmd"]) == crash for r in res["runs"])
    split = res["runs"][2]["cmd"]
    assert split[split.index("-ot") + 1] == r"blk\.(0)\.=CPU" and split[split.index("-p") + 1] == "0"
    assert [(b["format"], len(b["rows"])) for b in res["batched"]] == [("F16", 2), ("Q8_0", 2), ("Q4_K_M", 2)]
    assert "| Q4_K_M | split | 4 | 19745.5 | 5041.6 |" in (tmp_path / "out" / "peer.md").read_text()


def test_run_peer_reports_missing_batched_rows_and_failed_quantize(tiny, tmp_path):
    model, _ = tiny
    fake_tools(tmp_path / "bin", False)
    (tmp_path / "bin" / "llama-quantize").write_text("#!/bin/sh\necho 'invalid ftype' >&2\nexit 1\n")
    res = peer.run_peer(model, tmp_path / "out", tmp_path / "bin", threads=1, host_layers=1, quants=("F16", "Q8_0"),
                        gguf_dir=tmp_path / "gguf", batched_npl="1,4,8", reps=1, timeout=60)
    assert res["errors"] == ["llama-batched-bench F16 split: llama-batched-bench printed 2 of its 3 rows",
                             "llama-quantize Q8_0: exit 1: invalid ftype"]
    assert set(res["files"]) == {"F16"} and len(res["runs"]) == 4


def test_versus_table_gives_each_lane_row_its_step_error_and_cpu_rates():
    """The comparison table: ratio to llama.cpp at the same split, the plan's step error, and the CPU's rate in the
    measured steps beside its calibration (the source of most of the error)."""
    from graphrt.bench.versus import markdown
    lane = dict(format="bf16", placement="split+cpu", test="decode", batch=1, tokens_per_s=50.0,
                predicted_tokens_per_s=45.0, limit_tokens_per_s=60.0, streamed_layers=8, cpu_groups=5,
                cpu_in_step_GBps=118.2, cpu_calibrated_GBps=106.4)
    peer_row = dict(format="bf16", placement="split", test="decode", batch=1, tokens_per_s=25.0)
    table = markdown(dict(graphrt=[lane], llama_cpp=[peer_row], device="H100", torch="2.11",
                          limits=dict(h2d_GBps=53.0), peer_source="llama.cpp"))
    row = next(line for line in table.splitlines() if line.startswith("| decode"))
    assert "| 50.0 | 45.0 (-10.0%); CPU 118 in the step / 106 planned GB/s | 60.0 (83%) | 25.0 | 2.00 |" in row
    lane.update(cpu_together_GBps=110.0)   # the calibration beside copies, where the plan took the in-step rate
    table = markdown(dict(graphrt=[lane], llama_cpp=[peer_row], device="H100", torch="2.11",
                          limits=dict(h2d_GBps=53.0), peer_source="llama.cpp"))
    assert "CPU 118 in the step / 106 planned GB/s (110 calibrated beside copies) |" in table
