"""The CPU lane's signalled nodes (exec/lane_signal.py): on the CPU, the serving loop's C side (graphrt's kernel
library) takes a request, clears it, answers and stops; on the GPU, a captured step whose CPU groups are served
through the flags equals the same step through host nodes and the eager step, bitwise, replay after replay, and a
wait that gets no answer gives up and is reported by check()."""
import ctypes
import threading
import time

import pytest
import torch

from graphrt.exec import cpu_lane, lane_signal
from graphrt.weights.formats import int4_cpu

LIB = int4_cpu.library()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=2))
    return write_checkpoint(tmp_path_factory.mktemp("signal") / "m", cfg, random_tensors(cfg, 1))


@pytest.mark.skipif(LIB is None, reason=f"graphrt's kernel library does not build here: {int4_cpu.why_unavailable()}")
def test_the_serving_loop_takes_a_request_clears_it_answers_and_stops():
    flags = torch.zeros(4, dtype=torch.int32)      # request, answer, timeout, stop
    ptr = ctypes.c_void_p(flags.data_ptr())
    got = []
    server = threading.Thread(target=lambda: got.extend(LIB.graphrt_lane_wait(ptr, 1000, 50) for _ in range(2)))
    server.start()
    time.sleep(0.05)                               # past its 1 ms of spinning: it naps between looks
    flags[0] = 7                                   # what a post kernel writes
    deadline = time.monotonic() + 5
    while int(flags[0]) != 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert int(flags[0]) == 0                      # taken: the request is cleared
    assert server.is_alive()                       # and it waits for the next one
    flags[3] = 1                                   # stop
    server.join(5)
    assert not server.is_alive() and got == [7, 0]
    LIB.graphrt_lane_done(ptr, 7)
    assert flags.tolist() == [0, 7, 0, 1]


def chain(lane: cpu_lane.CpuLane, h: torch.Tensor) -> torch.Tensor:
    """Three CPU groups between GPU work, each reading the previous one's result: h [2, 1, 64] bf16."""
    for i in range(3):
        h = lane.run(torch.tanh(h) * (i + 1), lambda x, i=i: (x.float() * 0.5 + i).sin().to(x.dtype))
    return h * 2


@pytest.mark.gpu
def test_signalled_groups_equal_host_nodes_and_eager_replay_after_replay():
    dev = torch.device("cuda")
    if not lane_signal.available():
        pytest.skip("signalled lane nodes need NVRTC and graphrt's kernel library")
    lanes = {n: cpu_lane.CpuLane(dev, 2, 64, torch.bfloat16, threads=2, nodes=n) for n in ("signal", "host")}
    assert lanes["signal"].nodes == "signal" and lanes["host"].nodes == "host"
    static = torch.zeros(2, 1, 64, dtype=torch.bfloat16, device=dev)
    graphs, outs = {}, {}
    for name, lane in lanes.items():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            chain(lane, static)                    # warm-up, eager
        torch.cuda.synchronize()
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name], stream=stream):
            outs[name] = chain(lane, static)
    server = lanes["signal"].server
    assert server is not None and server.thread.is_alive()
    for seed in range(5):
        static.copy_(torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(seed)).to(dev, torch.bfloat16))
        for g in graphs.values():
            g.replay()
        torch.cuda.synchronize()
        cpu_lane.check()
        want = chain(lanes["host"], static)        # eager: direct calls
        assert torch.equal(outs["signal"], want) and torch.equal(outs["host"], want), seed
    del graphs
    lanes["signal"].release()
    assert not server.thread.is_alive() and lanes["signal"].server is None
    lanes["host"].release()


@pytest.mark.gpu
def test_a_wait_without_answer_gives_up_and_check_reports_it(monkeypatch):
    dev = torch.device("cuda")
    if not lane_signal.available():
        pytest.skip("signalled lane nodes need NVRTC and graphrt's kernel library")
    lane = cpu_lane.CpuLane(dev, 1, 64, torch.bfloat16, threads=1, nodes="signal")
    h = torch.ones(1, 1, 64, dtype=torch.bfloat16, device=dev)
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.graph(g, stream=stream):
        lane.run(h, lambda x: x)                   # starts the serving thread
    monkeypatch.setattr(lane_signal, "TIMEOUT_S", 0.05)
    start = time.perf_counter()
    lane.server.wait(123456)                       # no request was made: no answer comes
    torch.cuda.synchronize()
    assert 0.04 < time.perf_counter() - start < 2.0
    with pytest.raises(RuntimeError, match="123456 did not answer"):
        cpu_lane.check()
    g.replay()                                     # the lane still serves after a timeout was reported
    torch.cuda.synchronize()
    cpu_lane.check()
    del g
    lane.release()


def test_the_node_kind_is_checked_before_weights_load_and_resolved(tiny):
    from graphrt.config import ConfigError, RuntimeOptions
    from graphrt.runtime import Runtime
    with pytest.raises(ConfigError, match="lane_nodes must be"):
        RuntimeOptions(lane_nodes="driver")
    cpu = torch.device("cpu")
    assert cpu_lane.node_kind(cpu) == "host" and cpu_lane.node_kind(cpu, "host") == "host"
    with pytest.raises(ConfigError, match="lane_nodes='signal' needs a CUDA device.*use lane_nodes='auto' or 'host'"):
        cpu_lane.node_kind(cpu, "signal")
    with pytest.raises(ConfigError, match="lane_nodes must be"):
        cpu_lane.CpuLane(cpu, 1, 8, torch.float32, nodes="driver")
    # a runtime asked for signalled nodes where they cannot run says so while it plans, before any weights load
    with pytest.raises(ConfigError, match="lane_nodes='signal'"):
        Runtime.from_pretrained(tiny, device="cpu", cpu_lane=True, cpu_rate=1e9, lane_nodes="signal")
    if torch.cuda.is_available() and lane_signal.available():
        assert cpu_lane.node_kind(torch.device("cuda")) == "signal"
