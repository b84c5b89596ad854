"""The op layer of moa: stateless functions and autograd Functions.

reference: the per-expert oracle; torch_ops: the fused PyTorch path; triton: the Triton
kernels (import `moa_kernels.triton` explicitly: it needs triton). layout and routing hold
the static expert layout and the per-call routing plan that every backend shares.
"""
