"""Mixture-of-experts math: the Llama 4 router and the grouped SwiGLU over experts.

Shapes: T tokens, H hidden, E experts, I expert intermediate size, k experts per token.
"""

from typing import Sequence

import torch
import torch.nn.functional as F

from llama4serve.kernels.linear import PanelWeight, linear, panel_swiglu


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU with input-major fused weights: x [T, H], gate_up [H, 2I] (gate = first I columns), down [I, H],
    each a plain tensor or packed by `kernels.linear.pack_weight`.

    Dense layers, the shared expert and each routed expert all use this. Input-major weights make the batch-1
    GEMV read memory contiguously (about twice the bandwidth of `F.linear` on [out, in] weights on CPU).
    """
    if isinstance(gate_up, PanelWeight) and isinstance(down, PanelWeight):
        return panel_swiglu(x, gate_up, down)  # one native call, no intermediate torch ops
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
    return linear(F.silu(gate) * up, down)


def route_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4Router: top-k experts by logit; score = sigmoid(logit) computed in float32.

    router_logits [T, E] -> (expert_ids [T, k] int64, scores [T, k] in the logits' dtype).
    """
    top_values, expert_ids = torch.topk(router_logits, top_k, dim=-1)
    scores = torch.sigmoid(top_values.float()).to(router_logits.dtype)
    return expert_ids, scores


def grouped_swiglu(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up: torch.Tensor | Sequence[torch.Tensor],
    down: torch.Tensor | Sequence[torch.Tensor],
    first_expert: int = 0,
) -> torch.Tensor:
    """Each row of x [N, H] goes through its expert's SwiGLU; only experts that have rows do any work.

    expert_ids [N] are global ids; gate_up [E_local, H, 2I] and down [E_local, I, H] hold experts
    [first_expert, first_expert + E_local) in the checkpoint's fused layout (gate = first I columns), stacked or
    as per-expert lists of packed weights (`kernels.linear.pack_weight`). Returns [N, H] in the row order of x.
    """
    if x.shape[0] == 0:
        return torch.empty_like(x)
    if x.shape[0] == 1:  # batch-1 decode: no grouping to do
        e = int(expert_ids[0]) - first_expert
        return swiglu(x, gate_up[e], down[e])
    local_ids = expert_ids - first_expert
    order = torch.argsort(local_ids, stable=True)  # rows grouped by expert
    counts = torch.bincount(local_ids, minlength=len(gate_up)).tolist()
    experts = [e for e, n in enumerate(counts) if n]
    sizes = [counts[e] for e in experts]
    x_groups = x[order].split(sizes)
    if isinstance(gate_up[experts[0]], PanelWeight):  # one native call per expert
        out_sorted = torch.cat([swiglu(xe, gate_up[e], down[e]) for e, xe in zip(experts, x_groups)])
        return torch.empty_like(x).index_copy_(0, order, out_sorted)
    # Per expert only the two GEMMs; the activation runs once over all rows.
    gate, up = torch.cat([linear(xe, gate_up[e]) for e, xe in zip(experts, x_groups)]).chunk(2, dim=-1)  # [N, I]
    h_groups = (F.silu(gate) * up).split(sizes)
    out_sorted = torch.cat([linear(he, down[e]) for e, he in zip(experts, h_groups)])  # [N, H]
    return torch.empty_like(x).index_copy_(0, order, out_sorted)
