"""moa: heterogeneous Mixture-of-Adapters fine-tuning with fused kernels."""

from moa.config import ExpertSpec, RouterConfig, parse_experts
from moa.layers import MoALinear, MoARouter

__all__ = ["ExpertSpec", "MoALinear", "MoARouter", "RouterConfig", "parse_experts"]
__version__ = "0.1.0"
