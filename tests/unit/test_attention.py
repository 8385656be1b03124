"""Attention options the Hugging Face families need, against plain references: grouped-query heads,
q/k/v bias, QK-norm per head and over the full width; IA3 on the fused projection under GQA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_sys.adapters.ia3 import IA3Linear, build as build_ia3
from moe_sys.adapters.base import Site
from moe_sys.config.adapters import IA3Spec
from moe_sys.models.transformer import Attention, apply_rotary, rotary_tables


def reference(attn: Attention, x_BSD, cos, sin):
    """Every query head h reads key/value head h // (H / Hkv); norms by their formula."""
    B, S, _ = x_BSD.shape
    H, h, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = (x_BSD @ attn.qkv.weight.t() + (attn.qkv.bias if attn.qkv.bias is not None else 0)).split(attn.widths, -1)
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps) * w  # noqa: E731
    if attn.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k, v = q.view(B, S, H, d), k.view(B, S, h, d), v.view(B, S, h, d)
    if attn.qk_norm == "head":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary(q, cos[:S], sin[:S]), apply_rotary(k, cos[:S], sin[:S])
    group = torch.arange(H) // (H // h)
    scores = q @ k[:, group].transpose(-1, -2) / d ** 0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    out = F.softmax(scores, -1) @ v[:, group]
    return out.transpose(1, 2).reshape(B, S, -1) @ attn.proj.weight.t()


@pytest.mark.parametrize("kv, bias, norm, head_dim", [(2, False, "none", None), (1, True, "head", 12),
                                                      (2, False, "full", None), (4, True, "none", None)])
def test_attention_options_match_the_reference(kv, bias, norm, head_dim):
    torch.manual_seed(0)
    attn = Attention(32, 4, kv, head_dim, bias, norm)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    cos, sin = rotary_tables(attn.head_dim, 32, 10000.0)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(attn(x, cos, sin), reference(attn, x, cos, sin), atol=1e-5, rtol=1e-4)


def test_ia3_rescales_only_key_and_value_rows_under_gqa():
    attn = Attention(32, 4, n_kv_heads=1)
    layer = build_ia3(attn.qkv, IA3Spec(name="a"), Site("layers.0.attn.qkv", 32, 1))
    assert isinstance(layer, IA3Linear) and layer.offset == 32 and layer.delta_NW.shape == (1, 16)
