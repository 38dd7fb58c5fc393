"""Cross-modal attention (paper §3.4, eq. 9, Fig. 5): depth geometry queries the warped appearance.

F_g = F_w + γ · Softmax((W_q F_d)(W_k F_w)ᵀ) (W_v F_w), with γ a learned scalar initialised to 0 so a
freshly built model starts as plain feature warping and the attention is blended in as it learns.

``kv_pool`` > 1 (``generator.attention.kv_pool``, off by default) average-pools F_w by that factor
before W_k and W_v: every depth query still attends over the whole warped map, but over kv_pool² fewer
keys, so the score matrix is N×N/kv_pool². The 1×1 projections are linear, so with ``activation``
"none" this is the same as pooling the keys and values themselves. On the bundled live-128 weights,
pooling by 4 moves the avatar by 56 dB PSNR, less than the int8 engine does (docs/export.md).

At 64×64 features the score matrix is 4096×4096 per image; that is the per-frame hot spot. The
``auto`` implementation routes it through ``scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPU, a fused kernel on CPU) with ``scale=1`` because eq. 9 has no 1/√d factor; ``math`` is the
literal formula, kept as the reference the fused path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Literal eq. 9: q B×N×c, k B×M×c, v B×M×C → B×N×C (M = N unless the keys are pooled)."""
    scores = torch.bmm(q, k.transpose(1, 2))  # B×N×M
    return torch.bmm(F.softmax(scores, dim=-1), v)


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Same result as :func:`attention_math` through the fused SDPA kernels (B×N×c, B×M×c, B×M×C)."""
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(
        1
    )


class CrossModalAttention(nn.Module):
    """Refine warped features with source-depth queries.

    ``query_features``: B×C×H×W from the depth encoder E_d (may be projected once per source with
    :meth:`project_query` and cached). ``warped``: B×C×H×W F_w. Returns F_g: B×C×H×W.
    """

    def __init__(
        self,
        channels: int,
        qk_channels: int = 32,
        implementation: str = "auto",
        activation: str = "none",
        kv_pool: int = 1,
    ) -> None:
        super().__init__()
        if kv_pool < 1:
            raise ValueError(f"kv_pool must be >= 1, got {kv_pool}")
        self.kv_pool = kv_pool
        self.query_conv = nn.Conv2d(channels, qk_channels, kernel_size=1)
        self.key_conv = nn.Conv2d(channels, qk_channels, kernel_size=1)
        self.value_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        if implementation not in ("auto", "math"):
            raise ValueError(f"implementation must be 'auto' or 'math', got {implementation!r}")
        self.implementation = implementation
        if activation not in ("none", "relu"):
            raise ValueError(f"activation must be 'none' or 'relu', got {activation!r}")
        self.relu = activation == "relu"

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.relu else x

    def project_query(self, depth_features: torch.Tensor) -> torch.Tensor:
        """B×C×H×W depth features → B×(H·W)×c queries (source-only: cacheable)."""
        return self._act(self.query_conv(depth_features)).flatten(2).transpose(1, 2)

    def attend(self, query: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """query B×N×c (from :meth:`project_query`), warped B×C×H×W → F_g B×C×H×W."""
        b, c, h, w = warped.shape
        kv = F.avg_pool2d(warped, self.kv_pool) if self.kv_pool > 1 else warped  # B×C×H/p×W/p
        key = self._act(self.key_conv(kv)).flatten(2).transpose(1, 2)  # B×M×c, M = N/p²
        value = self._act(self.value_conv(kv)).flatten(2).transpose(1, 2)  # B×M×C
        fn = attention_math if self.implementation == "math" else attention_fused
        out = fn(query.to(value.dtype), key, value)  # B×N×C
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return warped + self.gamma * out

    def forward(self, depth_features: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return self.attend(self.project_query(depth_features), warped)
