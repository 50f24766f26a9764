"""graphrt: decode LLMs whose weights do not all fit on one GPU, one CUDA graph replay per token."""
from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, ModelConfig, RuntimeOptions
from .placement import BudgetError, CostModel, Placement, plan_placement
from .runtime import Runtime

__all__ = ["Runtime", "Checkpoint", "CheckpointError", "ConfigError", "ModelConfig", "RuntimeOptions",
           "BudgetError", "CostModel", "Placement", "plan_placement"]
__version__ = "0.1.0"
