"""Ragged batches and chat sessions on the graph path (CUDA): the same tokens as the eager path and
as each prompt decoded alone; streamed == resident with ragged rows."""
import pytest
import torch

from gpu_util import MID, runtime
from graphrt.chat import ChatSession

pytestmark = pytest.mark.gpu
LENGTHS = (1, 7, 40)


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("mode", ["resident", "half"])
def test_ragged_graph_equals_eager_and_single_runs(make_ckpt, mode):
    rt = runtime(make_ckpt("mid-llama", **MID), mode, 3, max_batch_size=4)
    ps = prompts(0)
    graph = rt.generate(ps, 48, use_graph=True)
    assert graph == rt.generate(ps, 48, use_graph=False)
    assert graph == [rt.generate([p], 48, use_graph=True)[0] for p in ps]
    kw = dict(temperature=0.9, top_k=50, top_p=0.9, seed=[5, 6, 7])
    sampled = rt.generate(ps, 48, use_graph=True, **kw)
    assert sampled == rt.generate(ps, 48, use_graph=False, **kw)
    assert sampled == [rt.generate([p], 48, use_graph=True, **{**kw, "seed": [s]})[0]
                       for p, s in zip(ps, kw["seed"])]


def test_ragged_streamed_equals_resident_graph(make_ckpt):
    path = make_ckpt("mid-llama", **MID)
    ps = prompts(1)
    want = runtime(path, "resident", max_batch_size=4).generate(ps, 40)
    assert runtime(path, "full", 3, max_batch_size=4, poison_freed_slots=True).generate(ps, 40) == want


def test_chat_session_default_model_graph_matches_eager(default_model):
    from graphrt import Runtime
    rt = Runtime.from_pretrained(default_model, device="cuda", dtype="float32", max_seq_len=512)
    replies = {}
    for use_graph in (True, False):
        s = ChatSession(rt, max_new_tokens=30, use_graph=use_graph)
        replies[use_graph] = [s.reply("What is the capital of France?"), s.reply("And of Germany?")]
        assert s.reused[1] > 0 and s.prefilled[1] < s.reused[1]
    assert replies[True] == replies[False]
    assert "Paris" in replies[True][0]
