"""Weight formats: dense float today; quantized formats follow."""
from .base import PartSpec, Weight, WeightFormat, embedding, linear
from .dense import Dense

__all__ = ["Dense", "PartSpec", "Weight", "WeightFormat", "embedding", "linear"]
