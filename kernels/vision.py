"""Llama 4 vision tower math (transformers' Llama4VisionModel), pure functions over tensors.

Shapes: N tiles, S tile side in pixels, P patch side, G = S / P patches per side, L = G*G + 1 sequence slots
(patches in row-major order, then the class token LAST), D vision hidden, Hd heads, Dh = D / Hd head_dim,
I encoder MLP width, r pixel-shuffle ratio.
"""

import torch
import torch.nn.functional as F

from llama4serve.kernels.rope import apply_rope


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Llama4UnfoldConvolution: pixels [N, C, S, S], weight [D, C*P*P] -> [N, G*G, D] (no bias).

    `F.unfold` lays each patch out channel-major (c, py, px), the order the checkpoint's linear expects.
    """
    patches = F.unfold(pixels, kernel_size=patch_size, stride=patch_size)  # [N, C*P*P, G*G]
    return patches.transpose(1, 2) @ weight.t()


def vision_rope_freqs_cis(patches_per_side: int, head_dim: int, theta: float) -> torch.Tensor:
    """2-D RoPE rotations [G*G + 1, Dh/2] (complex64) for the patch grid plus the trailing class token.

    Pair j < Dh/4 rotates by (x + 1) * f_j, pair Dh/4 + j by (y + 1) * f_j, with f_j = theta^(-4j/Dh) and
    (x, y) the patch's column and row; the class token is not rotated (Llama4VisionRotaryEmbedding).
    """
    g = patches_per_side
    idx = torch.arange(g * g)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2)[: head_dim // 4].float() / (head_dim // 2))  # [Dh/4]
    x = (idx % g + 1).float()[:, None] * freqs  # [G*G, Dh/4]
    y = (idx // g + 1).float()[:, None] * freqs
    angles = torch.cat([torch.cat([x, y], dim=1), torch.zeros(1, head_dim // 2)])  # [L, Dh/2]
    return torch.polar(torch.ones_like(angles), angles)


def vision_attention(x: torch.Tensor, w: dict[str, torch.Tensor], num_heads: int,
                     freqs_cis: torch.Tensor) -> torch.Tensor:
    """Llama4VisionAttention: bidirectional MHA with biases and 2-D RoPE on q and k. x [N, L, D] -> [N, L, D].

    w holds q/k/v/o `_weight` [D, D] and `_bias` [D] (checkpoint layout, out-major).
    """
    n, length, dim = x.shape
    head_dim = dim // num_heads
    q, k, v = (F.linear(x, w[f"{p}_weight"], w[f"{p}_bias"]).view(n, length, num_heads, head_dim) for p in "qkv")
    q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)  # freqs [L, Dh/2] broadcast over N and heads
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=head_dim**-0.5)  # [N, Hd, L, Dh]
    return F.linear(out.transpose(1, 2).reshape(n, length, dim), w["o_weight"], w["o_bias"])


def vision_mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
               fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None) -> torch.Tensor:
    """fc2(gelu(fc1(x))) with the exact (erf) GELU, as nn.GELU(). x [..., in] -> [..., out]."""
    return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def encoder_layer(x: torch.Tensor, w: dict[str, torch.Tensor], num_heads: int, freqs_cis: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """Llama4VisionEncoderLayer (pre-norm, LayerNorm with bias): x [N, L, D] -> [N, L, D]."""
    dim = x.shape[-1]
    h = F.layer_norm(x, (dim,), w["input_norm_weight"], w["input_norm_bias"], eps)
    x = x + vision_attention(h, w, num_heads, freqs_cis)
    h = F.layer_norm(x, (dim,), w["post_norm_weight"], w["post_norm_bias"], eps)
    return x + vision_mlp(h, w["fc1_weight"], w["fc1_bias"], w["fc2_weight"], w["fc2_bias"])


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Llama 4 pixel shuffle: x [N, G*G, C] -> [N, (G*r)^2, C/r^2].

    Output token (i, j) (row-major over the (G*r)-grid) concatenates patches (i/r + a, j/r + b), a, b < 1/r,
    in channel order (a, b, c): row offset outermost. The reshapes mirror modeling_llama4.pixel_shuffle line by
    line (merge along the width, transpose, merge along the height, transpose back); fc1's weights rely on it.
    """
    n, num_patches, channels = x.shape
    g = int(num_patches**0.5)
    x = x.view(n, g, int(g * ratio), int(channels / ratio))  # merge 1/r neighbours along the width
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(g * ratio), int(g * ratio), int(channels / ratio**2))  # ... then along the height
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(n, -1, x.shape[-1])


def vision_adapter(x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor) -> torch.Tensor:
    """Llama4VisionMLP2 (no biases): gelu(fc2(gelu(fc1(x)))). x [N, T, C/r^2] -> [N, T, projector_output_dim]."""
    return F.gelu(F.linear(F.gelu(F.linear(x, fc1_weight)), fc2_weight))
