"""graphrt: decode LLMs whose weights do not all fit on one GPU, one CUDA graph replay per token."""
from .config import ConfigError, ModelConfig, RuntimeOptions
from .plan.cost import CostModel
from .plan.placement import BudgetError, Placement, plan_placement
from .runtime import Runtime
from .sampling import SamplingParams
from .weights.checkpoint import Checkpoint, CheckpointError

__all__ = ["Runtime", "Checkpoint", "CheckpointError", "ConfigError", "ModelConfig", "RuntimeOptions",
           "BudgetError", "CostModel", "Placement", "SamplingParams", "plan_placement"]
__version__ = "0.3.0"
