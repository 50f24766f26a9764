"""Pre-quantized FP8 checkpoints in the compressed-tensors layout (the published `*-FP8` Llama files):
config.json has a `quantization_config` with quant_method "compressed-tensors"; each quantized linear
stores `weight` (float8_e4m3fn [out, in]) and `weight_scale` (float32 [out, 1] for the channel
strategy, one value for the tensor strategy). Activations are quantized per token at run time
(dynamic), so a static `input_scale` is not needed and is ignored."""
from __future__ import annotations

SUPPORTED = "weights: 8-bit float, symmetric, channel or tensor strategy (format float-quantized)"


class SchemeError(ValueError):
    pass


def fp8_scheme(raw_config: dict) -> dict | None:
    """The validated scheme ({"strategy", "ignore"}) of a compressed-tensors FP8 config, or None when
    the checkpoint is not quantized. Raises SchemeError naming what is unsupported."""
    qc = raw_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise SchemeError(f"quantization_config.quant_method {method!r} is not supported; graphrt reads "
                          f"compressed-tensors FP8 ({SUPPORTED}), or quantizes float checkpoints on load")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise SchemeError(f"compressed-tensors with {len(groups)} config groups is not supported ({SUPPORTED})")
    group = next(iter(groups.values()))
    w = group.get("weights") or {}
    fmt = qc.get("format", "float-quantized")
    ok = (w.get("num_bits") == 8 and w.get("type") == "float" and w.get("symmetric", True)
          and w.get("strategy") in ("channel", "tensor") and fmt in ("float-quantized", "naive-quantized"))
    if not ok:
        scheme = {k: w.get(k) for k in ("num_bits", "type", "strategy", "symmetric")}
        raise SchemeError(f"compressed-tensors scheme {scheme} (format {fmt!r}) is not supported; graphrt reads "
                          f"{SUPPORTED}. Load the float original with quantization='fp8', 'int8' or 'int4'")
    return {"strategy": w["strategy"], "ignore": tuple(qc.get("ignore") or ())}
