"""Weight formats: dense float, quantized on load (int8, fp8, int4) and GGUF's own block types."""
from .base import (PartSpec, RopeAppend, Weight, WeightFormat, embedding, for_cpu, linear, linear_fused,
                   stack_rows, stackable)
from .dense import Dense
from .fp8 import FP8, fp8_supported
from .gguf import GGUFQuant, dequantize as gguf_dequantize
from .int4 import Int4
from .int8 import Int8

__all__ = ["Dense", "FP8", "GGUFQuant", "Int4", "Int8", "PartSpec", "Weight", "WeightFormat", "embedding",
           "for_cpu", "fp8_supported", "gguf_dequantize", "linear", "linear_fused", "RopeAppend", "stack_rows",
           "stackable"]
