"""The llama.cpp peer (issue 17): graphrt's random bench model, run by llama.cpp's own tools.

`write_gguf`: the F16 GGUF of exactly the model in a graphrt checkpoint directory (config.json + safetensors, e.g.
`make_bench_model`): llama metadata and tensor names, Q/K rows permuted as convert_hf_to_gguf.py does, matrices
F16, vectors F32, Llama 3 RoPE scaling as the `rope_freqs` tensor (from graphrt's `rope_inv_freq`, as
convert_hf_to_gguf.py writes it; graphrt's own GGUF reader refuses such files). The tokenizer is a stand-in (the benchmarks draw random ids): GPT-2 byte tokens,
fillers, control tokens at the config's bos/eos ids. `run_peer`: that GGUF, Q8_0 and Q4_K_M from llama-quantize,
llama-bench decode (-n 64) and prefill (-p 4096) with every layer on the GPU and "split" (the first K layers'
weights in host memory, `-ot`), llama-batched-bench (split); peer.json and peer.md. Failures (no binary, failed
build, failed or timed-out run) are messages in the result, never exceptions.

    python3 -m graphrt.bench.peer --model DIR --bin /tmp/keep/llama.cpp/build/bin --out DIR [--host-layers K]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..models.llama import rope_inv_freq

QUANTS = ("F16", "Q8_0", "Q4_K_M")
KEEP = Path("/tmp/keep")  # where tools/llamacpp/build.sh builds and leaves its markers
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
BATCHED_COLUMNS = ("pp", "tg", "b", "n_kv", "t_pp_s", "s_pp_tps", "t_tg_s", "s_tg_tps", "t_s", "s_tps")


# ---- the GGUF ------------------------------------------------------------------------------------------------
def gguf_name(hf: str) -> str:
    """Hugging Face tensor name -> llama.cpp's ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    parts = hf.split(".")  # model.layers.<i>.<module>.<kind>
    return _TOP.get(hf) or f"blk.{int(parts[2])}.{_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def permute_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Hugging Face Q/K row order -> llama.cpp's (convert_hf_to_gguf.py `permute`); the inverse of
    graphrt.weights.gguf_source.unpermute_rows."""
    n = rows.shape[0]
    return rows.reshape(num_heads, 2, n // num_heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` (each frequency's divisor) for Llama 3 RoPE scaling, else None."""
    if cfg.rope_scaling is None:
        return None
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    return (plain / rope_inv_freq(cfg)).float()


def gpt2_byte_tokens() -> list[str]:
    """The 256 bytes in GPT-2's byte-to-unicode form, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def stand_in_vocab(size: int, bos: int | None, eos: int | None) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of `size` distinct tokens: control tokens at bos/eos, then byte tokens,
    a few merged tokens and fillers."""
    special = {i: t for i, t in ((bos, "<|begin_of_text|>"), (eos, "<|end_of_text|>")) if i is not None and i < size}
    merges = ["Ġ t", "h e", "i n", "e r", "a n"]
    pool = iter([(t, 1) for t in gpt2_byte_tokens()] + [(m.replace(" ", ""), 1) for m in merges] +
                [(f"<|filler_{i}|>", 5) for i in range(size)])
    pairs = [(special[i], 3) if i in special else next(pool) for i in range(size)]
    return [t for t, _ in pairs], [k for _, k in pairs], merges  # llama.cpp needs merges (any) to load


def write_gguf(model_dir: str | Path, path: str | Path) -> Path:
    """Write the F16 GGUF of the Llama checkpoint in `model_dir` to `path`, one tensor in memory at a time."""
    import gguf
    from safetensors import safe_open

    from ..weights.checkpoint import Checkpoint
    model_dir, path = Path(model_dir), Path(path)
    ckpt = Checkpoint(model_dir)  # checks config, shards, names and shapes
    cfg, files = ckpt.config, ckpt.tensor_files
    if cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM") or cfg.qkv_bias or cfg.sliding_window \
            or ckpt.fp8:
        raise ValueError(f"{model_dir}: the peer writes plain float llama models only, not this {cfg.architecture}")
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{m}.weight" for i in range(cfg.num_layers)
                                             for m in _LAYER]
    names += ["model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    bos, eos = cfg.bos_token_id, (cfg.eos_token_ids or (None,))[0]
    tokens, types, merges = stand_in_vocab(cfg.vocab_size, bos, eos)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_name, model_dir.name), (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_block_count, cfg.num_layers),
                       (w.add_feed_forward_length, cfg.intermediate_size), (w.add_head_count, cfg.num_heads),
                       (w.add_head_count_kv, cfg.num_kv_heads), (w.add_key_length, cfg.head_dim),
                       (w.add_value_length, cfg.head_dim), (w.add_rope_freq_base, cfg.rope_theta),
                       (w.add_rope_dimension_count, cfg.head_dim), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_vocab_size, cfg.vocab_size), (w.add_file_type, gguf.LlamaFileType.MOSTLY_F16),
                       (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "default"), (w.add_token_list, tokens),
                       (w.add_token_types, types), (w.add_token_merges, merges), (w.add_add_bos_token, False)):
        add(value)
    for add, token_id in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos)):
        if token_id is not None and token_id < cfg.vocab_size:
            add(token_id)
    for n in names:
        with safe_open(str(files[n]), framework="pt") as s:
            shape = tuple(s.get_slice(n).get_shape())
        dtype = np.dtype(np.float16 if len(shape) == 2 else np.float32)
        w.add_tensor_info(gguf_name(n), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    factors = rope_freq_factors(cfg)
    if factors is not None:
        w.add_tensor_info("rope_freqs.weight", tuple(factors.shape), np.dtype(np.float32), factors.numel() * 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n in names:
        with safe_open(str(files[n]), framework="pt") as s:
            t = s.get_tensor(n)
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(n.split(".")[-2])
        t = permute_rows(t, heads) if heads and "self_attn" in n else t
        w.write_tensor_data(t.to(torch.float16 if t.dim() == 2 else torch.float32).contiguous().numpy())
    if factors is not None:
        w.write_tensor_data(factors.numpy())
    w.close()
    return path


# ---- parsing the tools' output -------------------------------------------------------------------------------
def parse_llama_bench_json(text: str) -> list[dict[str, Any]]:
    """The records of `llama-bench -o json` (stdout), each with tokens/s `avg_ts` and `stddev_ts`."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise ValueError("no JSON array in llama-bench output")
    return json.loads(text[start:end + 1])


def parse_batched_bench(text: str) -> list[dict[str, float]]:
    """The rows of llama-batched-bench's table: PP, TG, B, N_KV, T_PP s, S_PP t/s, T_TG s, S_TG t/s, T s, S t/s."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(BATCHED_COLUMNS) and cells[0].isdigit():
            rows.append({k: (int(v) if i < 4 else float(v)) for i, (k, v) in enumerate(zip(BATCHED_COLUMNS, cells))})
    return rows


# ---- running llama.cpp ---------------------------------------------------------------------------------------
def host_layers_pattern(k: int) -> str:
    """The -ot value that keeps layers 0..k-1 in host memory (no ',': llama-bench splits -ot values on it)."""
    return r"blk\.(" + "|".join(str(i) for i in range(k)) + r")\.=CPU"


def build_state(bin_dir: Path) -> str:
    """Why the binaries are missing, from tools/llamacpp/build.sh's markers."""
    for tag in ("llamacpp", "llamacpp-cpu"):
        if (KEEP / f"{tag}.failed").is_file():
            return f"{tag} build failed: {(KEEP / f'{tag}.failed').read_text().strip()}"
        if (KEEP / f"{tag}.pid").is_file() and not (KEEP / f"{tag}.done").is_file():
            return f"{tag} build not finished (bash tools/llamacpp/build.sh --status; log {KEEP}/{tag}-build.log)"
    return f"not built: run tools/llamacpp/build.sh [--detach] (binaries expected in {bin_dir})"


def run_tool(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run one command: ok, rc, seconds, stdout, and `error` (why, and stderr's last lines) on failure."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (FileNotFoundError, PermissionError) as e:
        return dict(ok=False, rc=None, seconds=0.0, stdout="", error=f"{cmd[0]}: {e}")
    except subprocess.TimeoutExpired:
        return dict(ok=False, rc=None, seconds=timeout, stdout="", error=f"timed out after {timeout:.0f} s")
    res = dict(ok=p.returncode == 0, rc=p.returncode, seconds=time.perf_counter() - t, stdout=p.stdout)
    if p.returncode:
        why = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit {p.returncode}"
        res["error"] = f"{why}: " + " | ".join(p.stderr.strip().splitlines()[-6:])
    return res


def measure(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run llama-bench (-o json) or llama-batched-bench and parse its output into an entry (`error` on failure).
    A run killed by a signal runs once more without CPU weight repacking (the entry keeps `first_error`): on the
    development VM this llama.cpp's AMX kernels died of SIGILL/SIGSEGV on quantized weights in host memory."""
    bench = Path(cmd[0]).name == "llama-bench"
    r, entry = run_tool(cmd, timeout), {}
    if (r["rc"] or 0) < 0:
        entry["first_error"], cmd = r["error"], cmd + (["--repack", "0"] if bench else ["-nr"])
        r = run_tool(cmd, timeout)
    entry.update(cmd=cmd, seconds=r["seconds"])
    try:
        if not r["ok"]:
            raise RuntimeError(r["error"])
        if bench:
            rec = parse_llama_bench_json(r["stdout"])[0]
            entry.update(tokens_per_s=rec["avg_ts"], stddev=rec["stddev_ts"], record=rec)
        elif not (rows := parse_batched_bench(r["stdout"])):
            raise ValueError("no table rows in llama-batched-bench output")
        else:
            entry["rows"] = rows
    except Exception as e:  # noqa: BLE001 - reported in the result
        entry["error"] = str(e)
    return entry


def run_peer(model_dir: str | Path, out_dir: str | Path, llama_bin_dir: str | Path, threads: int | None = None,
             host_layers: int = 0, ngl: int = 99, quants: tuple[str, ...] = QUANTS, gguf_dir: str | Path | None = None,
             decode_tokens: int = 64, prefill_tokens: int = 4096, batched_npl: str = "1,4,8,16", reps: int = 5,
             timeout: float = 900.0) -> dict[str, Any]:
    """The peer's numbers; every failure is an entry of `errors` in the result (see the module docstring)."""
    model_dir, out_dir, bins = Path(model_dir), Path(out_dir), Path(llama_bin_dir)
    gdir = Path(gguf_dir) if gguf_dir else model_dir.parent / f"{model_dir.name}-gguf"
    threads = threads or os.cpu_count() or 1
    ot = host_layers_pattern(host_layers) if host_layers > 0 else None
    source = bins.parent.parent / "PEER_SOURCE.txt"
    res: dict[str, Any] = dict(model=str(model_dir), bin_dir=str(bins), threads=threads, host_layers=host_layers,
                               override_tensor=ot, ngl=ngl, files={}, runs=[], batched=[], errors=[],
                               llama_cpp=source.read_text().strip() if source.is_file() else "unknown")

    def save(error: str | None = None) -> dict[str, Any]:
        res["errors"] += [error] if error else []
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "peer.json").write_text(json.dumps(res, indent=1))
        (out_dir / "peer.md").write_text(markdown(res))
        return res

    if missing := [b for b in ("llama-bench", "llama-batched-bench", "llama-quantize") if not (bins / b).is_file()]:
        return save(f"llama.cpp binaries missing ({', '.join(missing)}): {build_state(bins)}")
    f16 = gdir / f"{model_dir.name}.F16.gguf"
    try:
        if not (f16.is_file() and f16.stat().st_mtime > (model_dir / "config.json").stat().st_mtime):
            write_gguf(model_dir, f16)
    except Exception as e:  # noqa: BLE001 - reported, the caller's other benchmarks go on
        return save(f"writing the F16 GGUF failed: {type(e).__name__}: {e}")
    placements = [("gpu", [])] + ([("split", ["-ot", ot])] if ot else [])
    npl = [int(x) for x in batched_npl.split(",")]
    for q in quants:
        path = f16 if q == "F16" else gdir / f"{model_dir.name}.{q}.gguf"
        if q != "F16" and not (path.is_file() and path.stat().st_mtime > f16.stat().st_mtime):
            r = run_tool([str(bins / "llama-quantize"), str(f16), str(path), q, str(threads)], timeout)
            if not r["ok"]:
                save(f"llama-quantize {q}: {r['error']}")
                continue
        res["files"][q] = dict(path=str(path), GB=path.stat().st_size / 1e9)
        common = ["-m", str(path), "-ngl", str(ngl), "-t", str(threads)]
        for place, extra in placements:
            for test, pn in (("decode", ["-p", "0", "-n", str(decode_tokens)]),
                             ("prefill", ["-p", str(prefill_tokens), "-n", "0"])):
                e = measure([str(bins / "llama-bench"), *common, "-fa", "1", "-r", str(reps), "-o", "json", *pn,
                             *extra], timeout)
                res["runs"].append(dict(format=q, placement=place, test=test, **e))
                save(f"llama-bench {q} {place} {test}: {e['error']}" if "error" in e else None)
        place, extra = placements[-1]
        e = measure([str(bins / "llama-batched-bench"), *common, "-fa", "on", "-c", str(max(npl) * 160 + 256),
                     "-npp", "128", "-ntg", "32", "-npl", batched_npl, *extra], timeout)
        if len(e.get("rows", npl)) < len(npl):
            e["error"] = f"llama-batched-bench printed {len(e['rows'])} of its {len(npl)} rows"
        res["batched"].append(dict(format=q, placement=place, **e))
        save(f"llama-batched-bench {q} {place}: {e['error']}" if "error" in e else None)
    return res


def markdown(res: dict[str, Any]) -> str:
    note = lambda r: f"no repack (first run {r['first_error'].split(':')[0]})" if "first_error" in r else ""  # noqa
    lines = [f"# llama.cpp peer: {Path(res['model']).name}", "",
             f"{res['llama_cpp']}; tools in `{res['bin_dir']}`; -ngl {res['ngl']}, flash attention on, "
             f"{res['threads']} threads. Split: the first {res['host_layers']} layers' weights in host memory "
             f"(`-ot {res['override_tensor']}`).", ""]
    if res["runs"]:
        lines += ["| format | GB | placement | test | tokens/s | +- | seconds | note |", "|---" * 8 + "|"]
        for r in res["runs"]:
            gb = res["files"].get(r["format"], {}).get("GB", 0.0)
            ts = f"{r['tokens_per_s']:.1f} | {r['stddev']:.1f}" if "tokens_per_s" in r else "failed | -"
            lines.append(f"| {r['format']} | {gb:.2f} | {r['placement']} | {r['test']} | {ts} | {r['seconds']:.1f} | "
                         f"{note(r)} |")
    if any("rows" in b for b in res["batched"]):
        lines += ["", "llama-batched-bench (-npp 128 -ntg 32; t/s summed over the B sequences):", "",
                  "| format | placement | B | prefill t/s | decode t/s | total s | note |", "|---" * 7 + "|"]
        for b in res["batched"]:
            for row in b.get("rows", []):
                lines.append(f"| {b['format']} | {b['placement']} | {row['b']} | {row['s_pp_tps']:.1f} | "
                             f"{row['s_tg_tps']:.1f} | {row['t_s']:.2f} | {note(b)} |")
    if res["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m graphrt.bench.peer", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="graphrt HF checkpoint directory")
    p.add_argument("--bin", type=Path, default=KEEP / "llama.cpp" / "build" / "bin", help="llama.cpp build/bin")
    p.add_argument("--out", type=Path, required=True, help="where peer.json and peer.md go")
    p.add_argument("--host-layers", type=int, default=0, help="layers whose weights stay in host memory (split)")
    p.add_argument("--gguf-dir", type=Path, default=None, help="where the GGUF files go (default: next to --model)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per llama.cpp command")
    for flag, kind, default in (("--threads", int, None), ("--ngl", int, 99), ("--quants", str, ",".join(QUANTS)),
                                ("--prefill-tokens", int, 4096), ("--npl", str, "1,4,8,16"), ("--reps", int, 5)):
        p.add_argument(flag, type=kind, default=default)
    a = p.parse_args(argv)
    res = run_peer(a.model, a.out, a.bin, a.threads, a.host_layers, a.ngl, tuple(a.quants.split(",")), a.gguf_dir,
                   prefill_tokens=a.prefill_tokens, batched_npl=a.npl, reps=a.reps, timeout=a.timeout)
    print(markdown(res))
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
