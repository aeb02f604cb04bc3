"""Mixture-of-experts math: the Llama 4 router and the grouped SwiGLU over experts.

Shapes: T tokens, H hidden, E experts, I expert intermediate size, k experts per token.
"""

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU with input-major fused weights: x [T, H], gate_up [H, 2I] (gate = first I columns), down [I, H].

    Dense layers, the shared expert and each routed expert all use this. Input-major weights make the batch-1
    GEMV read memory contiguously (about twice the bandwidth of `F.linear` on [out, in] weights on CPU).
    """
    gate, up = (x @ gate_up).chunk(2, dim=-1)  # [T, I] each
    return (F.silu(gate) * up) @ down


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
        out[order[start : start + n]] = swiglu(x_sorted[start : start + n], gate_up[e], down[e])
        start += n
    return out

