"""Slide aggregators: a bag of patch features -> K slide tokens plus per-token patch attention.

Both aggregators compute attention over patches in chunks with a two-pass softmax (scores first,
then the weighted sum), so memory stays linear in N and bounded per chunk: 100k patches fit on CPU.
An empty bag (a slide with no tissue) yields a learned "empty" embedding and all-zero attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pathvlm.errors import ModelError

_AGGREGATORS: dict[str, Callable[..., nn.Module]] = {}


def register_aggregator(name: str) -> Callable:
    def wrap(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _AGGREGATORS[name] = cls
        return cls

    return wrap


def list_aggregators() -> list[str]:
    return sorted(_AGGREGATORS)


def create_aggregator(name: str, in_dim: int, hidden_dim: int = 128, n_tokens: int = 1,
                      dropout: float = 0.0, **kwargs) -> nn.Module:
    """Build a registered aggregator. Output tokens have width ``hidden_dim``."""
    if name not in _AGGREGATORS:
        raise ModelError(f"unknown aggregator {name!r} (known: {', '.join(list_aggregators())})")
    return _AGGREGATORS[name](in_dim=in_dim, hidden_dim=hidden_dim, n_tokens=n_tokens,
                              dropout=dropout, **kwargs)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of scores [B, K, N] with mask [B, N]; masked -> exactly 0.

    Rows with no real patch come back all zero instead of NaN.
    """
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(attn, nan=0.0)


class _ChunkedAggregator(nn.Module):
    """Shared chunking and empty-bag handling; subclasses define scores and values per chunk."""

    def __init__(self, hidden_dim: int, n_tokens: int, chunk_size: int):
        super().__init__()
        if n_tokens < 1:
            raise ModelError(f"aggregator n_tokens must be >= 1, got {n_tokens}")
        self.n_tokens, self.out_dim, self.chunk_size = n_tokens, hidden_dim, chunk_size
        # what an empty bag (zero-tissue slide) maps to: learned, so the LLM can be told "no tissue"
        self.empty = nn.Parameter(torch.zeros(n_tokens, hidden_dim))

    def _chunks(self, n: int):
        for start in range(0, n, self.chunk_size):
            yield slice(start, min(n, start + self.chunk_size))

    def _scores(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, K, n]
        raise NotImplementedError

    def _values(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, n, H] (or [B, h, n, H/h])
        raise NotImplementedError

    def _pool(self, attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Pass 2: sum_n attn[b, k, n] * value(x[b, n]) chunk by chunk -> [B, K, H]."""
        out = None
        for sl in self._chunks(x.shape[1]):
            part = self._weighted(attn[..., sl], self._values(x[:, sl]))
            out = part if out is None else out + part
        return out

    def _weighted(self, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.bmm(attn, values)  # [B, K, n] @ [B, n, H]

    def _finish(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3:
            raise ModelError(f"aggregator expects features [B, N, D], got shape {tuple(features.shape)}")
        b, n, _ = features.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        empty = self.empty.unsqueeze(0).expand(b, -1, -1)
        if n == 0:
            return empty, features.new_zeros(b, self.n_tokens, 0)
        # pass 1: raw scores for all patches (only [B, K, N] is kept)
        scores = torch.cat([self._scores(features[:, sl]) for sl in self._chunks(n)], dim=-1)
        attn = _masked_softmax(scores, mask)  # [B, K, N]
        tokens = self._finish(self._pool(attn, features))  # [B, K, H]
        has_any = mask.any(dim=1)[:, None, None]
        return torch.where(has_any, tokens, empty), attn


@register_aggregator("abmil")
class GatedABMIL(_ChunkedAggregator):
    """Gated attention MIL (Ilse et al. 2018) with K attention branches -> K tokens."""

    def __init__(self, in_dim: int, hidden_dim: int = 128, n_tokens: int = 1, dropout: float = 0.0,
                 chunk_size: int = 8192):
        super().__init__(hidden_dim, n_tokens, chunk_size)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden_dim, hidden_dim)
        self.attn_u = nn.Linear(hidden_dim, hidden_dim)
        self.attn_w = nn.Linear(hidden_dim, n_tokens)

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # [B, n, H]

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # [B, n, H]
        gated = torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))
        return self.attn_w(gated).transpose(1, 2)  # [B, K, n]


@register_aggregator("resampler")
class Resampler(_ChunkedAggregator):
    """Cross-attention resampler (Perceiver / Q-Former style): K learned queries attend to patches.

    The returned attention [B, K, N] is the mean over heads.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 128, n_tokens: int = 8, dropout: float = 0.0,
                 n_heads: int = 4, chunk_size: int = 8192):
        super().__init__(hidden_dim, n_tokens, chunk_size)
        if hidden_dim % n_heads:
            raise ModelError(f"resampler hidden_dim {hidden_dim} not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, hidden_dim // n_heads
        self.queries = nn.Parameter(torch.randn(n_tokens, hidden_dim) * 0.02)
        self.norm_in = nn.LayerNorm(in_dim)
        self.to_k = nn.Linear(in_dim, hidden_dim)
        self.to_v = nn.Linear(in_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, hidden_dim)
        self.ffn = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, 4 * hidden_dim),
                                 nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden_dim, hidden_dim))
        self._head_attn: torch.Tensor | None = None

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, n, H] -> [B, h, n, H/h]
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        k = self._split(self.to_k(self.norm_in(x)))  # [B, h, n, d]
        q = self.queries.view(self.n_tokens, self.n_heads, self.head_dim).transpose(0, 1)  # [h, K, d]
        s = torch.einsum("hkd,bhnd->bhkn", q, k) / self.head_dim ** 0.5  # [B, h, K, n]
        return s.flatten(1, 2)  # [B, h*K, n]: heads folded into the softmax rows

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(self.to_v(self.norm_in(x)))  # [B, h, n, d]

    def _weighted(self, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b = attn.shape[0]
        attn = attn.view(b, self.n_heads, self.n_tokens, -1)
        return torch.einsum("bhkn,bhnd->bhkd", attn, values)  # [B, h, K, d]

    def _finish(self, pooled: torch.Tensor) -> torch.Tensor:
        b = pooled.shape[0]
        tokens = self.out(pooled.transpose(1, 2).reshape(b, self.n_tokens, -1))  # [B, K, H]
        tokens = tokens + self.queries
        return tokens + self.ffn(tokens)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, attn = super().forward(features, mask)
        b, n = features.shape[0], features.shape[1]
        if n == 0:
            return tokens, attn
        # super() worked on [B, h*K, N] rows; report the head mean per query
        return tokens, attn.view(b, self.n_heads, self.n_tokens, n).mean(1)
