"""Moved to moa/modules/: the layer router to layer_router.py, the group gates to
router.py, the load-balancing loss to aux_loss.py, the parallel adapter to
parallel_adapter.py, the prompt expert to prompt.py; kept so that old imports work."""

from moa.modules.aux_loss import (  # noqa: F401
    CollectingHook,
    GateCollector,
    collecting_pre_hook,
    load_balancing_loss,
)
from moa.modules.layer_router import (  # noqa: F401
    LayerGates,
    LayerRouter,
    RouterState,
    RoutingContext,
    constant_gates_pre_hook,
    instance_gate_reuse,
    masked_mean,
)
from moa.modules.parallel_adapter import (  # noqa: F401
    NORM_CLASS_SUFFIXES,
    NormRecordHook,
    ParallelAdapter,
    ParallelAdapterHook,
    is_pure_norm,
)
from moa.modules.prompt import (  # noqa: F401
    ATTENTION_NODE_DEPTH,
    ROTARY_NODE_DEPTH,
    CapturedAttentionInputs,
    PromptExpert,
    PromptOutputHook,
    attach_prompt,
    attention_saved_query,
    frozen_projection,
    prompt_key_cache,
    rotary_operands,
    rotate_half_query,
    saved_tensor_hooks_active,
)
from moa.modules.router import GroupGates  # noqa: F401
