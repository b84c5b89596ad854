"""Dense shrink: h = x @ W^T + b over every stacked shrink row, and its backward GEMMs.

W is [S, in] = [A_stack; W_down (adapters); router first layer (+ threshold row)], so x is
read once for all experts and the router (S = R + F). The same tiled GEMM kernel, fed other
strides, also gives the backward: dx = dh @ W and dW = dh^T @ x with db = column sums of
dh fused in (the program of the first column block sums its rows of dh^T).

Kernel `_matmul_kernel`: C[M, N] = A[M, K] @ B[K, N] (+ bias[N]), any strides.
  grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); each program walks K in BLOCK_K steps with an
  fp32 accumulator; operands cast to the data dtype (fp32 dots are IEEE unless TF32 is on).
  Row offsets are int64 (row * stride may pass 2^31).
FLOPs and bytes per call (T tokens, S rows, b = bytes per element, h kept in fp32):
  forward  h = x W^T + b:   2 T in S FLOPs;  b (T in + S in) + 4 T S bytes
  dx = dh W:                2 T S in FLOPs;  4 T S + b (S in + T in) bytes
  dW = dh^T x, db:          2 S T in FLOPs;  4 T S + b (T in + S in) bytes
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moa_kernels.triton.kernel_utils import block, dot_dtype, precision


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype,
           data_dtype: torch.dtype, bias: torch.Tensor | None = None,
           rowsum: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C = A @ B (+ bias) with fp32 accumulation.

    Args:
        a: [M, K], b: [K, N] (any strides, any float dtypes); bias: [N] or None.
        out_dtype: dtype of C. data_dtype: dtype both dot operands are cast to.
        rowsum: also return the row sums of A, [M] fp32 (the bias gradient of dW = dh^T x).
    Returns:
        C [M, N] out_dtype, and the row sums [M] fp32 or None.
    """
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    sums = torch.zeros(m, device=a.device, dtype=torch.float32) if rowsum else None
    if m == 0 or n == 0:
        return c, sums
    if k == 0:
        c.zero_()
        if bias is not None:
            c += bias
        return c, sums
    block_m, block_n, block_k = block(m), block(n), block(k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, sums if rowsum else c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, ROWSUM=rowsum, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT_DTYPE=dot_dtype(data_dtype), PRECISION=precision(data_dtype))
    return c, sums


def shrink_forward(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """h = x @ weight^T + bias. x [T, in], weight [S, in], bias [S] or None -> [T, S] fp32."""
    return matmul(x, weight.t(), out_dtype=torch.float32, data_dtype=x.dtype, bias=bias)[0]


def shrink_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    need_x: bool, need_weight: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of shrink_forward from grad [T, S] fp32.

    Returns dx [T, in] (x.dtype), dW [S, in] (weight.dtype), db [S] fp32; an empty tensor
    stands for a gradient that is not needed.
    """
    dx = matmul(grad, weight, out_dtype=x.dtype, data_dtype=x.dtype)[0] if need_x \
        else x.new_empty(0)
    dw, db = weight.new_empty(0), grad.new_empty(0)
    if need_weight:
        dw, db = matmul(grad.t(), x, out_dtype=weight.dtype, data_dtype=x.dtype, rowsum=True)
    return dx, dw, db


# ---------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------

@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, sums_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   HAS_BIAS: tl.constexpr, ROWSUM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_a = offs_m.to(tl.int64) * stride_am
    cols_b = offs_n.to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + rows_a[:, None] + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + cols_b[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if ROWSUM:
            sums += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + \
        offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if ROWSUM:
        if pid_n == 0:
            tl.store(sums_ptr + offs_m, sums, mask=mask_m)
