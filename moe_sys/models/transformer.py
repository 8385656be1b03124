"""Decoder-only LM (pre-norm, RMSNorm, rotary positions, SDPA attention) whose FFN slots may be MoE.

Legend: B batch, S sequence, D model dim, H heads, V vocab.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.moe.layer import MoELayer, build_moe_layer, is_moe_layer
from moe_sys.moe.routing import RouterOutput, RoutingContext


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(head_dim: int, max_len: int, theta: float):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles_SH = torch.outer(torch.arange(max_len).float(), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rotary(x_BHSd, cos_Sh, sin_Sh):
    x1, x2 = x_BHSd[..., ::2], x_BHSd[..., 1::2]
    cos, sin = cos_Sh.to(x_BHSd.dtype), sin_Sh.to(x_BHSd.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, qkv_bias: bool = False, proj_bias: bool = False,
                 causal: bool = True):
        """causal=False: every position sees every other (encoders: the ViT)."""
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model, bias=proj_bias)

    def forward(self, x_BSD, cos=None, sin=None, prefix_kv: Optional[Tuple[torch.Tensor, ...]] = None,
                attn_bias: Optional[torch.Tensor] = None):
        """cos/sin None: no rotary positions (the ViT adds learned ones to its input).
        prefix_kv: (k_BHPd, v_BHPd, visible_BP), P extra key/value positions before the sequence that
        every query may attend to where visible (prefix tuning); they carry no rotary position.
        attn_bias: [B, 1, S, S] added to the attention logits of every head (task-adapted attention;
        non-causal, without prefix_kv: an attention is wrapped by one of the two adapters, never both)."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if cos is not None:
            q, k = apply_rotary(q, cos[:S], sin[:S]), apply_rotary(k, cos[:S], sin[:S])
        if prefix_kv is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=self.causal)
        else:
            k_p, v_p, visible_BP = prefix_kv
            causal_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device)
            causal_SS = causal_SS.tril() if self.causal else causal_SS
            mask_B1SK = torch.cat([visible_BP[:, None, None, :].expand(B, 1, S, -1), causal_SS.expand(B, 1, S, S)], -1)
            out = F.scaled_dot_product_attention(q, torch.cat([k_p, k], 2), torch.cat([v_p, v], 2), attn_mask=mask_B1SK)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def returns_routing(ffn: nn.Module) -> bool:
    """Does this FFN slot take the routing context and return (y, RouterOutput)? MoE blocks do, and so
    do adapter layers that route (or wrap a module that does); they say so with ``returns_routing``."""
    return getattr(ffn, "returns_routing", isinstance(ffn, MoELayer))


_BATCH: ContextVar[Optional[RoutingContext]] = ContextVar("batch_routing_context", default=None)


@contextmanager
def batch_scope(ctx: RoutingContext):
    """Make the batch's routing context readable by sublayers it is not passed to (``current_batch``)."""
    token = _BATCH.set(ctx)
    try:
        yield
    finally:
        _BATCH.reset(token)


def current_batch() -> Optional[RoutingContext]:
    """The routing context of the forward pass in progress (None outside one). Adapters inside
    attention or an FFN read the batch's domain ids here to pick each example's adapter."""
    return _BATCH.get()


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, eps: float):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(d_model, eps), Attention(d_model, n_heads)
        self.ffn_norm, self.ffn = RMSNorm(d_model, eps), ffn

    def forward(self, x_BSD, cos, sin, ctx: RoutingContext):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin)
        if returns_routing(self.ffn):
            h, routing = self.ffn(self.ffn_norm(x_BSD), ctx)
            return x_BSD + h, routing
        return x_BSD + self.ffn(self.ffn_norm(x_BSD)), None


@dataclass
class LMOutput:
    logits_BSV: torch.Tensor
    routings: List[RouterOutput]  # one per MoE layer, in depth order


class TransformerLM(nn.Module):
    def __init__(self, cfg, moe_cfg, num_domains: int = 1):
        """cfg: ModelConfig; moe_cfg: MoEConfig (decides which layers hold an MoE block);
        num_domains: distinct domain ids in batches (task-level routing and the MI loss need it)."""
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, self._ffn(i, cfg, moe_cfg, num_domains), cfg.norm_eps) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init(cfg.init_std)

    @staticmethod
    def _ffn(i: int, cfg, moe_cfg, num_domains: int) -> nn.Module:
        if not is_moe_layer(i, moe_cfg):
            return SwiGLU(cfg.d_model, cfg.d_ff)
        return build_moe_layer(cfg.d_model, cfg.d_ff, moe_cfg, cfg.init_std, num_domains)

    def _init(self, std: float):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)

    def moe_layers(self) -> List[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, tokens_BS: torch.Tensor, domain_B: Optional[torch.Tensor] = None,
                mask_BS: Optional[torch.Tensor] = None) -> LMOutput:
        """domain_B / mask_BS reach the routers (example- and task-level routing, padding)."""
        x = self.embed(tokens_BS)
        ctx = RoutingContext(tuple(tokens_BS.shape), domain_B, mask_BS)
        routings = []
        with batch_scope(ctx):
            for layer in self.layers:
                x, routing = layer(x, self.rope_cos, self.rope_sin, ctx)
                if routing is not None:
                    routings.append(routing)
        return LMOutput(self.head(self.norm(x)), routings)


def token_losses(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position, [B, S] (fp32)."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), reduction="none").view_as(labels_BS)


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked positions (fp32)."""
    ce = token_losses(logits_BSV, labels_BS).flatten()
    mask = loss_mask_BS.flatten().float()
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)
