"""Diagnosis of tensor parallel capture on 2 GPUs: prints each stage per rank, dumps every thread's stack and
exits if a stage hangs.  python3 -m torch.distributed.run --nproc-per-node 2 tools/diag_tp.py"""
import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from graphrt import Runtime
from graphrt.weights.synthetic import make_config, random_tensors, write_checkpoint

rank = int(os.environ["RANK"])
faulthandler.dump_traceback_later(int(os.environ.get("DIAG_S", "45")), exit=True)
say = lambda *a: print(f"[r{rank}]", *a, flush=True, file=sys.stderr)  # noqa: E731
path = Path("/tmp/tp-diag")
if rank == 0 and not (path / "config.json").is_file():
    cfg = make_config("LlamaForCausalLM", 256, 512, 4, 8, 2, 1024)
    write_checkpoint(path, cfg, random_tensors(cfg, 5, torch.bfloat16))
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
dist.barrier()
say("group up")
rt = Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", tensor_parallel=2, max_seq_len=128)
ids = torch.tensor([[5, 17, 99, 3]])
say("eager", rt.generate(ids, 4, use_graph=False).tolist())
mode = os.environ.get("DIAG_CAPTURE_MODE")
if mode:   # override graph.py's capture_error_mode
    _init = torch.cuda.graph.__init__

    def _patched(self, *a, **k):
        k["capture_error_mode"] = mode
        _init(self, *a, **k)
    torch.cuda.graph.__init__ = _patched
say("capturing")
g = rt.capture(1)
say("captured")
g.prefill(ids)
torch.cuda.synchronize()
say("prefilled")
for _ in range(3):
    g.step()
torch.cuda.synchronize()
say("stepped", g.tokens().tolist() if hasattr(g, "tokens") else "")
say("graph", rt.generate(ids, 4, use_graph=True).tolist())
g = None
rt.shutdown()
