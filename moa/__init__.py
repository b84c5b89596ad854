"""moa: heterogeneous Mixture-of-Adapters fine-tuning with fused kernels."""

from moa.config import ExpertSpec, MoAConfig, RouterConfig, parse_experts
from moa.layers import MoALinear, MoARouter
from moa.model import MoAModel, get_moa_model

__all__ = ["ExpertSpec", "MoAConfig", "MoALinear", "MoAModel", "MoARouter", "RouterConfig",
           "get_moa_model", "parse_experts"]
__version__ = "0.1.0"
