import pytest
import torch

from graphrt.weights.synthetic import make_config, random_tensors, write_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(name, **make_config kwargs, shards=1, seed=0, dtype=torch.float32) -> directory."""
    cache = {}

    def make(name="tiny-llama", shards=1, seed=0, dtype=torch.float32, **kw):
        key = (name, shards, seed, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            base = dict(arch="LlamaForCausalLM", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=256)
            base.update(kw)
            base.setdefault("dtype", str(dtype).replace("torch.", ""))
            cfg = make_config(**base)
            out = tmp_path_factory.mktemp(name)
            cache[key] = write_checkpoint(out, cfg, random_tensors(cfg, seed, dtype), shards)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def default_model():
    from graphrt.default_model import DEFAULT_DIR, fetch_default
    return fetch_default(DEFAULT_DIR)
