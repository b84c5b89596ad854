"""The op layer of moa: stateless functions and autograd Functions.

reference: the per-expert oracle; torch_ops: the fused PyTorch path; triton: the Triton
kernels (import `moa_kernels.triton` explicitly: it needs triton). layout holds the static
expert layout every backend shares; routing the router head and the torch backend's
per-call routing plan.
"""
