"""The MoA module kinds, a room each: dispatch.py (what they share: backend, dtypes,
hooks), router.py (MoARouter, the group gates), linear.py (MoALinear), aux_loss.py (the
load-balancing loss), layer_router.py (one router per decoder layer), parallel_adapter.py,
prompt.py (the prompt expert). Import the module you need; this package face imports
nothing (moa/__init__.py is the API)."""
