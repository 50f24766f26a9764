"""Weight formats: GGUF dequantization bit-exact with the gguf package; each format's linear against the matrix it
stores and against the float original; parts shapes; int4's kernel arithmetic; the quantization policy.
CUDA paths (cuBLAS / tinygemm / FP8 GEMMs, graph capture) are the tests marked gpu."""
import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graphrt.config import ConfigError
from graphrt.weights.formats import (FP8, Dense, GGUFQuant, Int4, Int8, Weight, fp8_supported, linear, stack_rows,
                                     stackable)
from graphrt.weights.formats import int4_cpu
from graphrt.weights.formats.gguf import GGML_TYPES, dequantize, row_bytes, type_name
from graphrt.weights.formats.int4_layouts import _to_uint8_pairs, pack_tinygemm, unpack_tinygemm
from graphrt.weights.formats.policy import QUANTIZATIONS, quantization_policy
from graphrt.weights.layout import ALIGN, FormatPolicy, model_groups

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf.quants.quantize supports these
# byte offsets of the fp16 scale fields in each block (random bytes there could be NaN / inf)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, rows: int, blocks: int, rng) -> np.ndarray:
    """Valid GGUF rows [rows, bytes]: random bytes, with finite random halves in the scale fields."""
    _, _, size = GGML_TYPES[name]
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        raw[..., at:at + 2] = (rng.standard_normal((rows, blocks, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def float_rows(name: str, x: np.ndarray) -> np.ndarray:
    data = x if name == "F32" else gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    return np.ascontiguousarray(data).view(np.uint8).reshape(x.shape[0], -1)


def bits(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float32).view(np.int32)


# ------------------------------------------------------------------------------------------ GGUF dequantize
def test_type_table_matches_gguf():
    for name, (type_id, block, size) in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType[name]
        assert int(qtype) == type_id and gguf.GGML_QUANT_SIZES[qtype] == (block, size)
        assert type_name(qtype) == type_name(type_id) == type_name(name.lower()) == name
    with pytest.raises(ValueError, match="Q2_K is not supported"):
        type_name(gguf.GGMLQuantizationType.Q2_K)


@pytest.mark.parametrize("name", [n for n in GGML_TYPES if n not in FLOAT_TYPES])
def test_dequantize_random_blocks_bit_exact(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    raw = random_blocks(name, rows=9, blocks=4, rng=rng)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    got = dequantize(torch.from_numpy(raw), name)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert np.array_equal(bits(got), bits(want)), f"{name}: {np.count_nonzero(bits(got) != bits(want))} differ"


@pytest.mark.parametrize("name", QUANTIZABLE + FLOAT_TYPES)
def test_dequantize_quantized_floats_bit_exact(name):
    """Rows the gguf package itself quantizes (incl. all-zero and constant blocks), read back at an aligned
    offset inside a larger uint8 buffer, as a group buffer holds them."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 128)).astype(np.float32) * np.array([1, 1e-3, 50, 0, 1, 1], np.float32)[:, None]
    x[5] = 0.25
    raw = float_rows(name, x)
    buffer = torch.zeros(2 * ALIGN + raw.size, dtype=torch.uint8)
    view = buffer[ALIGN:ALIGN + raw.size].view(raw.shape)
    view.copy_(torch.from_numpy(raw))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(x.shape)
    assert np.array_equal(bits(dequantize(view, name)), bits(want))


def test_gguf_format_parts_linear_embedding():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    for name in ("Q8_0", "Q4_K", "F16"):
        fmt = GGUFQuant(name, torch.float32)
        raw = float_rows(name, w) if name != "Q4_K" else random_blocks(name, 48, 1, rng)
        (spec,) = fmt.parts((48, 256))
        assert spec.shape == (48, row_bytes(name, 256)) == raw.shape and spec.dtype == torch.uint8
        parts = {"q": torch.from_numpy(raw)}
        dense = fmt.dense(parts, torch.float32)
        assert np.array_equal(bits(dense), bits(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])))
        x = torch.randn(2, 3, 256)
        torch.testing.assert_close(fmt.linear(x, parts, None), F.linear(x, dense), rtol=0, atol=0)
        ids = torch.tensor([[5, 0, 47], [5, 5, 1]])
        assert torch.equal(fmt.embedding(ids, parts, torch.float32), dense[ids])
    assert GGUFQuant("Q8_0", torch.float32).encode(torch.from_numpy(w), torch.device("cpu"))["q"].shape == (48, 272)
    with pytest.raises(ValueError, match="not a whole number"):
        GGUFQuant("Q4_K", torch.float32).parts((8, 100))


# ------------------------------------------------------------------------------------------ quantized formats
FORMATS = {
    "int8": Int8(torch.float32),
    "fp8": FP8(torch.float32),
    "int4-cpu": Int4(torch.float32, 128, "cpu"),
    "int4-cuda-layout": Int4(torch.float32, 128, "cuda"),
    "gguf-q8_0": GGUFQuant("Q8_0", torch.float32),
    "gguf-q4_0": GGUFQuant("Q4_0", torch.float32),
}
# relative Frobenius error of the stored matrix vs the float original (gaussian weights), upper bounds.
# Measured (seed 0, [192, 576]): int8 0.0076, fp8 0.0263, int4 0.0897 (groups of 64), Q8_0 0.0053, Q4_0 0.0860
QUANT_ERROR = {"int8": 0.015, "fp8": 0.03, "int4-cpu": 0.12, "int4-cuda-layout": 0.12, "gguf-q8_0": 0.006,
               "gguf-q4_0": 0.14}
# linear vs F.linear(x, dense(parts)) relative error, per activation dtype (the kernel's own rounding)
LINEAR_ERROR = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}
SHAPE = (192, 576)  # 576 = SmolLM2's hidden size: not a multiple of 128 (int4 falls back to groups of 64)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def weight():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key", FORMATS)
def test_encode_matches_parts_and_error_is_small(key, weight):
    fmt = FORMATS[key]
    parts = fmt.encode(weight, torch.device("cpu"))
    specs = fmt.parts(SHAPE)
    assert sorted(parts) == sorted(s.name for s in specs)
    for s in specs:
        assert tuple(parts[s.name].shape) == s.shape and parts[s.name].dtype == s.dtype, s
        assert parts[s.name].device.type == "cpu"
    err = rel(fmt.dense(parts, torch.float32), weight)
    print(f"{key}: relative error of the stored matrix {err:.4f}")
    assert 0 < err < QUANT_ERROR[key]


@pytest.mark.parametrize("dtype", LINEAR_ERROR, ids=str)
@pytest.mark.parametrize("key", FORMATS)
def test_linear_matches_dense(key, dtype, weight):
    fmt = FORMATS[key]
    parts = fmt.encode(weight, torch.device("cpu"))
    x = torch.randn(2, 3, SHAPE[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(SHAPE[0]).to(dtype)
    y = linear(x, Weight(fmt, parts, SHAPE), bias)
    assert y.dtype == dtype and y.shape == (2, 3, SHAPE[0])
    ref = F.linear(x.float(), fmt.dense(parts, torch.float32), bias.float())
    err = rel(y, ref)
    print(f"{key} {dtype}: linear vs dense {err:.2e}, vs original {rel(y, F.linear(x.float(), weight, bias.float())):.4f}")
    assert err < LINEAR_ERROR[dtype]
    assert rel(y, F.linear(x.float(), weight, bias.float())) < 1.2 * QUANT_ERROR[key] + LINEAR_ERROR[dtype]


@pytest.mark.parametrize("key", ["int8", "fp8", "gguf-q8_0", "int4-cpu"])
def test_embedding_rows_match_dense(key, weight):
    fmt = FORMATS[key]
    parts = fmt.encode(weight, torch.device("cpu"))
    ids = torch.tensor([[3, 0, 191], [7, 7, 1]])
    assert torch.equal(fmt.embedding(ids, parts, torch.bfloat16), fmt.dense(parts, torch.bfloat16)[ids])


def test_int8_cpu_kernel_is_used_and_exact_in_fp32(weight):
    fmt = Int8(torch.float32)
    parts = fmt.encode(weight, torch.device("cpu"))
    q, scale = parts["w"], parts["scale"]
    assert q.abs().max() == 127 and torch.equal(scale, weight.abs().amax(1) / 127)
    x = torch.randn(4, SHAPE[1])
    assert torch.equal(fmt.linear(x, parts, None), torch._weight_int8pack_mm(x, q, scale))


def test_fp8_parts_and_from_stored(weight):
    fmt = FP8(torch.bfloat16)
    parts = fmt.encode(weight, torch.device("cpu"))
    w = parts["w"].float()
    assert w.abs().amax(1).eq(448).all()  # each row's largest value maps to e4m3's largest
    stored = FP8.from_stored(parts["w"], parts["scale"][:, None])  # channel strategy: [out, 1]
    assert torch.equal(stored["scale"], parts["scale"]) and stored["scale"].shape == (SHAPE[0],)
    tensor = FP8.from_stored(parts["w"], torch.tensor([0.5]))  # tensor strategy: one scale for all rows
    assert tensor["scale"].shape == (SHAPE[0],) and tensor["scale"].eq(0.5).all()
    assert torch.equal(fmt.dense(tensor, torch.float32), w * 0.5)
    with pytest.raises(ValueError, match="one per row"):
        FP8.from_stored(parts["w"], torch.ones(3))
    assert fp8_supported("cpu")


def test_int4_formula_is_the_cpu_kernel_arithmetic(weight):
    """dense(parts, float32) == the CPU kernel applied to an identity: w = (q - 8) * scale + zero, exactly."""
    fmt = Int4(torch.float32, 128, "cpu")
    parts = fmt.encode(weight, torch.device("cpu"))
    sz = parts["scales_and_zeros"]
    assert sz.shape == (576 // 64, SHAPE[0], 2)  # 576 is not a multiple of 128: groups of 64
    eye = torch.eye(SHAPE[1])
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, parts["w"], 64, sz.float()).t()
    assert torch.equal(fmt.dense(parts, torch.float32), kernel)
    q, _ = fmt.quantize(weight)
    scale = sz[..., 0].float().t().repeat_interleave(64, 1)
    zero = sz[..., 1].float().t().repeat_interleave(64, 1)
    assert torch.equal(kernel, (q.float() - 8) * scale + zero)


def test_int4_unpack_and_cuda_layout_shape():
    q = torch.randint(0, 16, (64, 512), dtype=torch.int32)
    for packing in ("cpu", "cuda"):
        fmt = Int4(torch.bfloat16, 128, packing)
        parts = {"w": (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8) if packing == "cpu"
                       else pack_tinygemm(q, 8)), "scales_and_zeros": torch.zeros(4, 64, 2, dtype=torch.bfloat16)}
        assert torch.equal(fmt.unpack(parts), q)
    # [out/8, in/(T*16), 32, T/2] int32, as torch's Meta kernel of the CUDA pack op says, for T = 8, 4, 2
    for shape, tiles in (((64, 512), 8), ((48, 576), 4), ((40, 96), 2)):
        (w, sz) = Int4(torch.bfloat16, 128, "cuda").parts(shape)
        meta = torch.ops.aten._convert_weight_to_int4pack(torch.empty(shape[0], shape[1] // 2, dtype=torch.uint8,
                                                                      device="meta"), tiles)
        assert w.shape == tuple(meta.shape) == (shape[0] // 8, shape[1] // (16 * tiles), 32, tiles // 2)
        assert w.dtype == meta.dtype == torch.int32
        assert unpack_tinygemm(pack_tinygemm(q[: shape[0], : shape[1]], tiles)).equal(q[: shape[0], : shape[1]])
    with pytest.raises(ValueError, match="in_features % 32"):
        Int4(torch.bfloat16).parts((64, 100))
    with pytest.raises(ValueError, match="out_features % 16"):
        Int4(torch.bfloat16, packing="cpu").parts((40, 128))


def test_formats_read_from_a_group_buffer():
    """Parts packed at 256-byte offsets in one uint8 buffer, read back through the layout's typed views."""
    from graphrt.config import ModelConfig
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                                 "intermediate_size": 160, "num_hidden_layers": 1, "num_attention_heads": 4,
                                 "num_key_value_heads": 2})
    for q in QUANTIZATIONS:
        policy = quantization_policy(q, torch.float32, torch.device("cpu"))
        layer = model_groups(cfg, policy)[1]
        buffer = torch.zeros(layer.nbytes, dtype=torch.uint8)
        originals, direct = {}, {}
        for t in layer.tensors:
            subs = [torch.randn(t.source_shape(rows)) for _, rows in t.sources]
            originals[t.key] = torch.cat(subs)
            stored = stack_rows(t.format, [t.format.encode(v, torch.device("cpu")) if t.is_matrix else {"w": v}
                                           for v in subs])
            direct[t.key] = stored
            for part, offset in t.parts:
                assert offset % ALIGN == 0
                buffer[offset:offset + part.nbytes].view(part.dtype).view(part.shape).copy_(stored[part.name])
        views = layer.views(buffer)
        stacked = stackable(policy.matrix)
        assert (set(views) >= {"qkv", "gate_up"}) == stacked and ("q" in views) == (not stacked), (q, set(views))
        x = torch.randn(3, 64)
        for key in ("qkv", "gate_up", "down") if stacked else ("q", "k", "v", "gate", "up", "down"):
            w = views[key]
            assert w.format == policy.matrix
            xk = torch.randn(3, w.shape[1])
            assert torch.equal(linear(xk, w), w.format.linear(xk, direct[key], None))
            # a stack is the matrices side by side: its dequantized form is the rows of each, encoded alone
            assert torch.equal(w.format.dense(w.parts, torch.float32),
                               w.format.dense(direct[key], torch.float32)), key
        if stacked:  # the stacked product equals the separate products, column block by column block
            qkv = views["qkv"]
            sub = [qkv.format.encode(v, torch.device("cpu")) for v in originals["qkv"].split((64, 32, 32))]
            want = torch.cat([qkv.format.linear(x, p, None) for p in sub], dim=-1)
            torch.testing.assert_close(linear(x, qkv), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(views["input_norm"], originals["input_norm"])


# ------------------------------------------------------------------------------------------ policy
def test_quantization_policy():
    assert QUANTIZATIONS == ("int8", "fp8", "int4", "int4-g64", "int4-g32")
    cpu = torch.device("cpu")
    for name, cls in zip(QUANTIZATIONS, (Int8, FP8, Int4, Int4, Int4)):
        p = quantization_policy(name, torch.bfloat16, cpu)
        assert isinstance(p, FormatPolicy) and p.compute_dtype == torch.bfloat16
        assert isinstance(p.format_of("model.layers.0.mlp.down_proj.weight"), cls)
        assert isinstance(p.format_of("lm_head.weight"), cls)                       # untied head: quantized
        assert p.format_of("model.embed_tokens.weight") == Dense(torch.bfloat16)    # table (and tied head): dense
    # on the CPU: graphrt's kernel's "blocked" layout in bfloat16 where AVX512-BF16 runs, else ATen's "cpu" layout
    assert quantization_policy("int4", torch.bfloat16, cpu).matrix.packing == ("blocked" if int4_cpu.available() else "cpu")
    assert quantization_policy("int4", torch.float32, cpu).matrix.packing == "cpu"
    assert quantization_policy("int4-g64", torch.bfloat16, cpu).matrix.packing == "cpu"
    assert quantization_policy("int4", torch.bfloat16, cpu, in_features=(576,)).matrix.packing == "cpu"
    assert [quantization_policy(q, torch.bfloat16, cpu).matrix.group_size for q in QUANTIZATIONS[2:]] == [128, 64, 32]
    assert quantization_policy(None, torch.float32, cpu) == FormatPolicy(torch.float32)
    with pytest.raises(ValueError, match="unknown quantization 'int3'; use one of int8, fp8, int4, int4-g64, int4-g32"):
        quantization_policy("int3", torch.bfloat16, cpu)
    with pytest.raises(ConfigError):
        quantization_policy("nf4", torch.bfloat16, cpu)


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("key", ["int8", "fp8", "int4", "gguf-q4_k", "gguf-q6_k", "gguf-q8_0"])
def test_cuda_linear_matches_dense_and_captures(key, dtype):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(SHAPE, generator=gen)
    if key.startswith("gguf"):
        name = key[5:].upper()
        fmt = GGUFQuant(name, dtype)
        raw = random_blocks(name, SHAPE[0], 3, np.random.default_rng(3)) if name.endswith("K") else \
            float_rows(name, w.numpy())
        parts = {"q": torch.from_numpy(raw)}
        shape = (SHAPE[0], raw.shape[1] // GGML_TYPES[name][2] * GGML_TYPES[name][1])
    else:
        fmt = {"int8": Int8(dtype), "fp8": FP8(dtype), "int4": Int4(dtype, 128, "cuda")}[key]
        parts, shape = fmt.encode(w, dev), SHAPE
    if key == "fp8" and not fp8_supported(dev):
        pytest.skip("no FP8 on this GPU")
    parts = {k: v.to(dev) for k, v in parts.items()}
    x = torch.randn(5, shape[1], generator=gen).to(dev, dtype)
    bias = torch.randn(shape[0], generator=gen).to(dev, dtype)
    y = fmt.linear(x, parts, bias)
    assert y.dtype == dtype and y.shape == (5, shape[0])
    ref = F.linear(x.float(), fmt.dense(parts, torch.float32), bias.float())
    bound = {"fp8": 0.06, "int4": 1e-2}.get(key, LINEAR_ERROR[dtype] * (3 if dtype != torch.float32 else 10))
    err = rel(y, ref)
    print(f"cuda {key} {dtype}: linear vs dense {err:.2e}")
    assert err < bound
    # capture and replay: the same numbers, no host syncs or CPU tensors inside
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fmt.linear(static_x, parts, bias)  # warm up (cuBLAS handles, workspaces) outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fmt.linear(static_x, parts, bias)
    static_x.copy_(x * 2)
    g.replay()
    torch.testing.assert_close(out, fmt.linear(x * 2, parts, bias), rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_int4_pack_op_layout_and_arithmetic():
    """The CUDA pack op equals pack_tinygemm; the kernel on an identity equals dense(parts, bf16)."""
    dev = torch.device("cuda")
    for shape in ((64, 512), (48, 576), (1536, 576), (40, 96)):
        q = torch.randint(0, 16, shape, dtype=torch.int32)
        tiles = 8 if shape[1] % 128 == 0 else 4 if shape[1] % 64 == 0 else 2
        op = torch.ops.aten._convert_weight_to_int4pack(_to_uint8_pairs(q).to(dev), tiles).cpu()
        assert torch.equal(op, pack_tinygemm(q, tiles)), shape
    fmt = Int4(torch.bfloat16, 128, "cuda")
    w = torch.randn(256, 512)
    parts = {k: v.to(dev) for k, v in fmt.encode(w, dev).items()}
    eye = torch.eye(512, device=dev, dtype=torch.bfloat16)
    kernel = fmt.linear(eye, parts, None).t()
    dense = fmt.dense(parts, torch.bfloat16)
    mismatch = (kernel != dense).float().mean().item()
    print(f"int4 cuda kernel vs dense(bf16): {mismatch:.2e} of values differ")
    assert mismatch < 1e-3 and rel(kernel, dense) < 1e-3


@pytest.mark.gpu
def test_cuda_gguf_dequantize_bit_exact():
    for name in GGML_TYPES:
        rng = np.random.default_rng(4)
        raw = float_rows(name, rng.standard_normal((16, 512)).astype(np.float32)) if name in FLOAT_TYPES else \
            random_blocks(name, 16, 2, rng)
        want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(16, -1)
        got = dequantize(torch.from_numpy(raw).cuda(), name).cpu()
        assert np.array_equal(bits(got), bits(want)), name


@pytest.mark.gpu
def test_cuda_fp8_uses_scaled_mm_and_odd_shapes_fall_back():
    dev = torch.device("cuda")
    if not fp8_supported(dev):
        pytest.skip("no FP8 on this GPU")
    fmt = FP8(torch.bfloat16)
    for shape in ((256, 512), (40, 72)):  # multiples of 16 (scaled_mm), and not (dequantize path)
        parts = {k: v.to(dev) for k, v in fmt.encode(torch.randn(shape), dev).items()}
        for m in (1, 3, 17):
            x = torch.randn(m, shape[1], device=dev, dtype=torch.bfloat16)
            y = fmt.linear(x, parts, None)
            ref = F.linear(x.float(), fmt.dense(parts, torch.float32))
            assert y.shape == (m, shape[0]) and rel(y, ref) < 0.06
    # the scaled_mm path quantizes activations: it is not the dequantize path's exact result
    parts = {k: v.to(dev) for k, v in fmt.encode(torch.randn(256, 512), dev).items()}
    x = torch.randn(4, 512, device=dev, dtype=torch.bfloat16)
    assert not torch.equal(fmt.linear(x, parts, None), F.linear(x, fmt.dense(parts, torch.bfloat16)))


def test_int4_packing_on_cuda_follows_the_row_kernel_and_the_widths(monkeypatch):
    """On a CUDA device bfloat16 int4 takes the blocked layout (NVRTC row kernel) where that kernel compiles and
    every linear input width is a multiple of 64; otherwise ATen's tinygemm layout (widths % 32 suffice)."""
    from graphrt.weights.formats import policy
    from graphrt.config import ModelConfig
    cuda = torch.device("cuda")
    monkeypatch.setattr(policy.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(policy.int4_cuda, "available", lambda index=0: True)
    monkeypatch.setattr(policy, "_triton", lambda: (object(), object()))
    assert quantization_policy("int4", torch.bfloat16, cuda, (4096, 4096, 14336)).matrix.packing == "blocked"
    assert quantization_policy("int4", torch.bfloat16, cuda, (64, 64, 160)).matrix.packing == "cuda"
    assert quantization_policy("int4", torch.float32, cuda, (64, 64, 160)).matrix.packing == "blocked"
    monkeypatch.setenv("GRAPHRT_INT4_PACKING", "cuda")
    assert quantization_policy("int4", torch.bfloat16, cuda, (4096,)).matrix.packing == "cuda"
    monkeypatch.setenv("GRAPHRT_INT4_PACKING", "tiles")
    with pytest.raises(ConfigError, match="GRAPHRT_INT4_PACKING='tiles'"):
        quantization_policy("int4", torch.bfloat16, cuda)
    from graphrt.weights.synthetic import make_config
    cfg = ModelConfig.from_dict(make_config("LlamaForCausalLM", 4096, 14336, 2, 32, 8, 1024))
    assert policy.linear_in_features(cfg) == (4096, 4096, 14336)
    assert policy.linear_in_features(cfg, 2) == (4096, 2048, 7168)
