"""Mixture-of-experts math: the Llama 4 router and the grouped SwiGLU over experts.

Shapes: T tokens, H hidden, E experts, I expert intermediate size, k experts per token.
"""

import torch
import torch.nn.functional as F


def swiglu_mlp(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU (dense layers and the shared expert): x [T, H], gate/up [I, H], down [H, I] -> [T, H]."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


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
    gate_up: torch.Tensor,
    down: torch.Tensor,
    first_expert: int = 0,
) -> torch.Tensor:
    """Each row of x [N, H] goes through its expert's SwiGLU; only experts that have rows do any work.

    expert_ids [N] are global ids; gate_up [E_local, H, 2I] and down [E_local, I, H] hold experts
    [first_expert, first_expert + E_local) in the checkpoint's fused layout (gate = first I columns).
    Returns [N, H] in the row order of x.
    """
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    local_ids = expert_ids - first_expert
    order = torch.argsort(local_ids, stable=True)
    counts = torch.bincount(local_ids, minlength=gate_up.shape[0]).tolist()
    x_sorted = x[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = x_sorted[start : start + n]
        gate, up = (rows @ gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        out[order[start : start + n]] = (F.silu(gate) * up) @ down[e]
        start += n
    return out

