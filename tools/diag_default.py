"""Diagnosis: the default model's GPU logits (bf16, fp32) against the CPU fp32 run, with each fused kernel on
or replaced by its reference math. Prints one line per variant."""
import torch

from graphrt.default_model import fetch_default
from graphrt.models import fused, llama
from graphrt.runtime import Runtime

path = fetch_default()
cpu = Runtime.from_pretrained(path, device="cpu", dtype="float32", max_seq_len=128)
text = cpu.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
ids = torch.tensor([cpu.encode(text)])
ref = cpu.logits(ids)
ORIG = {n: getattr(llama, n) for n in ("rms_norm", "rope_append", "silu_mul")}
REF = dict(rms_norm=fused.rms_norm_reference, rope_append=fused.rope_append_reference,
           silu_mul=fused.silu_mul_reference)


def run(dtype: str, reference: tuple[str, ...], **kw) -> None:
    for n in ORIG:
        setattr(llama, n, REF[n] if n in reference else ORIG[n])
    rt = Runtime.from_pretrained(path, device="cuda", dtype=dtype, max_seq_len=128, **kw)
    got = rt.logits(ids).cpu()
    rel = ((got - ref).norm() / ref.norm()).item()
    out = rt.generate(ids, 12, use_graph=False)
    answer = rt.tokenizer.decode(out[0, ids.shape[1]:].tolist())
    last = ((got[0, -1] - ref[0, -1]).norm() / ref[0, -1].norm()).item()
    print(f"{dtype:9s} reference={','.join(reference) or '-':30s} {kw} rel {rel:.3e} last-pos rel {last:.3e} "
          f"argmax agree {(got.argmax(-1) == ref.argmax(-1)).float().mean():.3f} answer {answer!r}", flush=True)
    rt.close()


for dtype in ("float32", "bfloat16"):
    run(dtype, ())
    run(dtype, tuple(ORIG))
    for n in ORIG:
        run(dtype, (n,))
run("bfloat16", (), prefill_chunk=1)
