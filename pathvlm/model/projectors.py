"""Projectors: aggregator tokens [.., D_out] -> LLM embedding width, by name (LLaVA naming)."""

from __future__ import annotations

import re

from torch import nn

from pathvlm.errors import ModelError

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def list_projectors() -> list[str]:
    """Registered names; ``mlpNx_gelu`` accepts any N >= 1 (listed: 2 and 3)."""
    return ["linear", "mlp2x_gelu", "mlp3x_gelu"]


def create_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    if name == "linear":
        return nn.Linear(in_dim, out_dim)
    match = _MLP.match(name)
    if not match or int(match.group(1)) < 1:
        raise ModelError(f"unknown projector {name!r} (known: linear, mlpNx_gelu e.g. mlp2x_gelu)")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
