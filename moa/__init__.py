"""moa: heterogeneous Mixture-of-Adapters fine-tuning with fused kernels."""

from moa._version import __version__
from moa.config import ExpertSpec, MoAConfig, RouterConfig, parse_experts
from moa.model import MoAModel, get_moa_model
from moa.modules.linear import MoALinear
from moa.modules.router import MoARouter

__all__ = ["ExpertSpec", "MoAConfig", "MoALinear", "MoAModel", "MoARouter", "RouterConfig",
           "__version__", "get_moa_model", "parse_experts"]
