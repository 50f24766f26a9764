"""Tensor parallel speed (issue 11), in one run on K GPUs of one host:

    torchrun --nproc-per-node 2 tools/bench_tp.py --out DIR      (or: tools/gpu_check.sh tp) [--layers 16] [--quantization int8]

On the 16-layer Llama-3.1-8B-shaped bf16 model (random weights), every layer streamed through 3 slots, batch 1,
graph path:
  - 1 GPU: rank 0 alone (the others wait), its smallest budget;
  - K GPUs: each rank its shard's smallest budget (every layer of its shard streamed);
  - each link's pinned H2D bandwidth measured alone and with every link copying at once;
  - the collectives of one step (2 all-reduces per layer of [1, 1, hidden] and the embedding's, one all-gather
    of the logits' vocabulary shards), timed alone on the GPU.
Rank 0 writes tp.json and tp.md: tokens/s, the ratio K GPUs / 1 GPU, streaming as % of the sum of the links.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from graphrt import Runtime
from graphrt.bench.quant import CHUNK, MAX_SEQ_LEN, RING, all_streamed_budget, step_time
from graphrt.bench.run import cuda_median, make_bench_model
from graphrt.weights.store import pinned_empty, unpin
from graphrt.config import ModelConfig
from graphrt.weights.shard import make_shard

NEW_TOKENS = 64


def h2d_GBps(nbytes: int = 1 << 30) -> float:
    src, dst = pinned_empty(nbytes), torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    rate = max(nbytes / cuda_median(lambda: dst.copy_(src, non_blocking=True)) for _ in range(3)) / 1e9
    unpin(src)
    return rate


def collectives_ms(cfg: ModelConfig, world: int) -> float:
    """Milliseconds of one step's collectives (batch 1), issued back to back."""
    h = torch.zeros(1, 1, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    logits = torch.zeros(1, 1, cfg.vocab_size // world, dtype=torch.float32, device="cuda")
    parts = [torch.empty_like(logits) for _ in range(world)]

    def step() -> None:
        for _ in range(2 * cfg.num_layers + 1):
            dist.all_reduce(h)
        dist.all_gather(parts, logits)

    step()
    return 1e3 * cuda_median(step, 20)


def runtime(path: Path, budget: int, quantization: str | None, tp: int) -> Runtime:
    gc.collect()
    torch.cuda.empty_cache()
    return Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", quantization=quantization,
                                   max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK, ring_depth=RING, stream_unit="layer",
                                   gpu_budget=budget, tensor_parallel=tp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--quantization", default=None)
    a = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    path = Path(f"/tmp/graphrt-bench/llama8b-{a.layers}")
    if rank == 0:
        make_bench_model(path, a.layers)
    dist.barrier()
    cfg = ModelConfig.from_file(path / "config.json")
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, world=world, layers=a.layers,
                     quantization=a.quantization or "bf16", nccl=".".join(map(str, torch.cuda.nccl.version())))

    alone = h2d_GBps() if rank == 0 else 0.0          # rank 0's link by itself
    dist.barrier()
    together = torch.tensor([h2d_GBps()], device="cuda")   # every link at once
    links = [torch.zeros_like(together) for _ in range(world)]
    dist.all_gather(links, together)
    res.update(h2d_alone_GBps=alone, h2d_together_GBps=[x.item() for x in links])

    ids = torch.randint(3, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    one_tokens = margins = None
    if rank == 0:   # one GPU, the whole model
        torch.manual_seed(0)
        rt = runtime(path, all_streamed_budget(cfg, a.quantization), a.quantization, 1)
        one_tokens = rt.generate(ids, NEW_TOKENS).cpu()                    # [1, 8 + NEW_TOKENS], greedy, graph
        top2 = rt.logits(one_tokens[:, :-1]).topk(2, dim=-1).values[0]     # [T, 2] float32
        margins = (top2[:, 0] - top2[:, 1]).cpu()                           # the 1-GPU logit margin per position
        t = step_time(rt)
        res["one_gpu"] = dict(tokens_per_s=1 / t, ms_per_step=1e3 * t, streamed_GB=rt.placement.streamed_bytes / 1e9,
                              pct_of_link=100 * rt.placement.streamed_bytes / (alone * 1e9) / t,
                              plan=rt.placement.describe())
        rt.close()
        del rt
    dist.barrier()

    shard_cfg = make_shard(cfg, rank, world).config
    rt = runtime(path, all_streamed_budget(shard_cfg, a.quantization), a.quantization, world)
    torch.manual_seed(0)   # the same prompt on every rank
    t = step_time(rt)
    streamed = torch.tensor([rt.placement.streamed_bytes / 1e9], device="cuda")
    dist.all_reduce(streamed)
    tokens = rt.generate(ids, NEW_TOKENS).cpu()
    same = torch.tensor([int(torch.equal(tokens, rt.generate(ids, NEW_TOKENS, use_graph=False).cpu()))],
                        device="cuda")
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    plan = rt.placement.describe()
    rt.close()          # its graphs go before the process group does (pytorch#115388)
    del rt
    gc.collect()
    torch.cuda.empty_cache()
    coll = collectives_ms(cfg, world)
    if rank == 0:
        link_sum = sum(res["h2d_together_GBps"])
        res["tp"] = dict(tokens_per_s=1 / t, ms_per_step=1e3 * t, streamed_GB_all_ranks=streamed.item(),
                         pct_of_links=100 * streamed.item() / link_sum / t, collectives_ms_per_step=coll,
                         graph_equals_eager_tokens=bool(same.item()), plan_rank0=plan)
        res["speedup"] = res["tp"]["tokens_per_s"] / res["one_gpu"]["tokens_per_s"]
        diff = (tokens != one_tokens).nonzero()
        first = int(diff[0, 1]) if len(diff) else None
        res["tp"].update(same_tokens_as_one_gpu=first is None, first_difference=first,
                         one_gpu_margin_there=None if first is None else float(margins[first - 1]))
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "tp.json").write_text(json.dumps(res, indent=1))
        o, p = res["one_gpu"], res["tp"]
        md = [f"# tensor parallel: {world} x {res['device']}, torch {res['torch']}, NCCL {res['nccl']}", "",
              f"{a.layers}-layer Llama-3.1-8B shape, {res['quantization']}, every layer streamed through {RING} slots, "
              "batch 1, graph replay.", "",
              f"Pinned H2D: rank 0 alone {alone:.1f} GB/s; all links at once "
              f"{', '.join(f'{x:.1f}' for x in res['h2d_together_GBps'])} GB/s (sum {link_sum:.1f}).", "",
              "| GPUs | tokens/s | ms/step | GB streamed per step (all ranks) | % of link bandwidth | collectives ms/step |",
              "|---|---|---|---|---|---|",
              f"| 1 | {o['tokens_per_s']:.1f} | {o['ms_per_step']:.2f} | {o['streamed_GB']:.2f} | {o['pct_of_link']:.1f} | - |",
              f"| {world} | {p['tokens_per_s']:.1f} | {p['ms_per_step']:.2f} | {p['streamed_GB_all_ranks']:.2f} | "
              f"{p['pct_of_links']:.1f} | {coll:.3f} |", "",
              f"{world} GPUs / 1 GPU: {res['speedup']:.2f}x. Graph == eager tokens on every rank: "
              f"{p['graph_equals_eager_tokens']}. Greedy tokens ({NEW_TOKENS} new) equal to 1 GPU's: "
              + ("yes." if p["same_tokens_as_one_gpu"] else
                 f"no, first difference at position {p['first_difference']}, where the 1-GPU run's top-2 logit margin "
                 f"was {p['one_gpu_margin_there']:.4f}.")]
        (a.out / "tp.md").write_text("\n".join(md) + "\n")
        print("\n".join(md), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
