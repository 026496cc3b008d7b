"""Aggregators, projectors and strict weight loading, on tiny random tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_model

from pathvlm.errors import DependencyError, ModelError
from pathvlm.model import create_aggregator, create_projector, list_aggregators, list_projectors
from pathvlm.model.llm import load_llm
from pathvlm.model.loading import load_strict

D, H, K = 24, 32, 3


def _agg(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_aggregator(name, in_dim=D, hidden_dim=H, n_tokens=K, **kw).eval()


@pytest.mark.parametrize("name", list_aggregators())
def test_aggregator_shapes_and_mask(name):
    agg = _agg(name)
    x = torch.randn(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    tokens, attn = agg(x, mask)
    assert tokens.shape == (2, K, H) and attn.shape == (2, K, 10)
    assert torch.isfinite(tokens).all() and torch.isfinite(attn).all()
    assert torch.all(attn[1, :, 6:] == 0)  # exactly zero, not just small
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, K))
    # padding must not change a bag's tokens: compare with the unpadded bag alone
    alone, _ = agg(x[1:, :6], None)
    torch.testing.assert_close(tokens[1:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list_aggregators())
def test_aggregator_chunking_matches_one_pass(name):
    x = torch.randn(1, 50, D)
    one, a1 = _agg(name, chunk_size=1000)(x, None)
    many, a2 = _agg(name, chunk_size=7)(x, None)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1, a2)


@pytest.mark.parametrize("name", list_aggregators())
def test_aggregator_empty_bag(name):
    agg = _agg(name)
    with torch.no_grad():
        agg.empty.normal_()
    tokens, attn = agg(torch.zeros(2, 0, D), torch.zeros(2, 0, dtype=torch.bool))
    assert attn.shape == (2, K, 0)
    torch.testing.assert_close(tokens, agg.empty.expand(2, -1, -1))
    # a fully masked row in a batch also gets the empty embedding, and gradients stay finite
    agg.train()
    x = torch.randn(2, 5, D, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5])
    tokens, attn = agg(x, mask)
    torch.testing.assert_close(tokens[1], agg.empty)
    assert torch.all(attn[1] == 0)
    tokens.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in agg.parameters() if p.grad is not None)


def test_aggregator_errors():
    with pytest.raises(ModelError, match="unknown aggregator"):
        create_aggregator("nope", in_dim=D)
    with pytest.raises(ModelError, match=r"\[B, N, D\]"):
        _agg("abmil")(torch.randn(5, D), None)


@pytest.mark.parametrize("name", [*list_projectors(), "mlp4x_gelu"])
def test_projector(name):
    proj = create_projector(name, H, 48)
    out = proj(torch.randn(2, K, H))
    assert out.shape == (2, K, 48) and torch.isfinite(out).all()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in proj.modules())
    assert n_linear == (1 if name == "linear" else int(name[3:].split("x")[0]))


@pytest.mark.parametrize("bad", ["mlp0x_gelu", "mlp2x_relu", "conv"])
def test_projector_unknown(bad):
    with pytest.raises(ModelError, match="unknown projector"):
        create_projector(bad, H, 48)


def test_load_strict_reports_keys_by_name(tmp_path):
    agg = _agg("abmil")
    save_model(agg, str(tmp_path / "ok.safetensors"))
    other = _agg("abmil")
    load_strict(other, tmp_path / "ok.safetensors")
    torch.testing.assert_close(other.attn_w.weight, agg.attn_w.weight)
    save_model(_agg("resampler"), str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelError, match=r"missing keys: \[.*attn_u.weight.*unexpected keys: \[.*queries"):
        load_strict(other, tmp_path / "wrong.safetensors")
    wide = create_aggregator("abmil", in_dim=D, hidden_dim=H, n_tokens=K + 1)
    with pytest.raises(ModelError, match=r"has shape \(3, 32\), model expects \(4, 32\)"):
        load_strict(wide, tmp_path / "ok.safetensors")


def test_llm_errors(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_llm(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="unknown quantization"):
        load_llm(str(tmp_path), quantization="3bit")
    if not torch.cuda.is_available():
        with pytest.raises(DependencyError, match="CUDA"):
            load_llm(str(tmp_path), quantization="4bit")
