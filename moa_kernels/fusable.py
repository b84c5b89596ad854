"""Small linears as the compiler fuses them best when decoding.

Under torch.compile a GEMM is a call of its own (an extern kernel on the CPU, cuBLAS on
CUDA) that no pointwise op fuses into. A decoding step runs a few tokens through the
experts' small products (the LoRA expand, C = 8 columns; the parallel adapter's up
projection from its 16-wide bottleneck; the router head, 28 -> 7), where such a call costs
more than its arithmetic. `fusable_linear` traces them as a reduction over the input
features instead, `(x[:, None, :] * W[None]).sum(-1)`: the compiler generates one loop nest
that also takes the pointwise ops before it (activation, gating) and after it (bias, the
add into the base output, the next layer's rotary or residual add). Only short sums
(K <= 64) are traced so; a long one (the adapter's down projection, K = hidden) stays a
GEMM, which a generated loop does not beat.

`fusable_attention` does the same for the prompt expert's attention over its L prompt
tokens (L = 10 in the presets): softmax(q k^T) v as two short reductions and a softmax,
which the compiler fuses with the query's rotary before and the gated add after, where an
attention kernel would be an extern call plus a copy of the batch-expanded prompt keys and
values per layer and step. FLOPs: 2 B H S L D multiply-adds; bytes: q, k, v read once.

FLOPs and bytes are those of the GEMM (T * N * K multiply-adds, reading x [T, K] and W
[N, K] once); only the summation order differs (a rounding-level difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Compiled without grad mode on at most this many rows (decoding), linears summing over at
# most COMPILED_REDUCTION_MAX_FEATURES input features are traced as reductions; prefill,
# training, eager mode and longer sums (a generated loop is slower than a GEMM library
# there) use the GEMM.
COMPILED_REDUCTION_MAX_TOKENS = 64
COMPILED_REDUCTION_MAX_FEATURES = 64


def _decoding_sum(rows: int, length: int) -> bool:
    """Whether a product over `rows` rows summing `length` terms is traced as a reduction:
    under torch.compile, without grad mode, both within the limits above."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() \
        and rows <= COMPILED_REDUCTION_MAX_TOKENS and length <= COMPILED_REDUCTION_MAX_FEATURES


def _as_reduction(x: torch.Tensor) -> bool:
    # eagerly (the hot path) only the is_compiling call runs
    return torch.compiler.is_compiling() and x.dim() == 2 and \
        _decoding_sum(x.shape[0], x.shape[1])


def fusable_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K], weight [N, K]: traced as a reduction under
    torch.compile without grad mode for T <= COMPILED_REDUCTION_MAX_TOKENS and K <=
    COMPILED_REDUCTION_MAX_FEATURES, a GEMM otherwise."""
    if _as_reduction(x):
        out = (x[:, None, :] * weight[None, :, :]).sum(-1)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def fusable_attention(query: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor) -> torch.Tensor:
    """softmax(query keys^T) values (no scaling, no mask) for query [B, H, S, D] and keys,
    values [B, H, L, D] (expanded views welcome): traced as reductions under torch.compile
    without grad mode for B * S <= COMPILED_REDUCTION_MAX_TOKENS and L <=
    COMPILED_REDUCTION_MAX_FEATURES, one scaled_dot_product_attention call otherwise."""
    if _decoding_sum(query.shape[0] * query.shape[2], keys.shape[-2]):
        scores = (query[:, :, :, None, :] * keys[:, :, None, :, :]).sum(-1)  # [B, H, S, L]
        probs = torch.softmax(scores, dim=-1)
        return (probs[..., None] * values[:, :, None, :, :]).sum(-2)  # [B, H, S, D]
    return F.scaled_dot_product_attention(query, keys, values, scale=1.0)


def fusable_addmm(addend: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """addend + x @ weight^T (addend [T, N] or [N]): as fusable_linear, a reduction where
    that applies, else one addmm.

    In the reduction form a [T, N] addend is added through a size-1 view: inductor rewrites
    add(mm(a, b), t) into addmm(t, a, b) (the base GEMM of a MoALinear and its experts'
    output), and on the CPU that library call first copies t into its output and runs
    slower than mm on decoding shapes (benchmarks/RESULTS.md). Kept an add, it fuses into
    the reduction's loop instead: one kernel and one copy fewer per linear."""
    if _as_reduction(x):
        product = fusable_linear(x, weight)
        if addend.dim() != 2:
            return addend + product
        return (addend[None] + product)[0]
    return torch.addmm(addend, x, weight.t())


__all__ = ["COMPILED_REDUCTION_MAX_FEATURES", "COMPILED_REDUCTION_MAX_TOKENS", "fusable_addmm",
           "fusable_attention", "fusable_linear"]
