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

from moe_sys.moe import recompute
from moe_sys.moe.layer import MoELayer, build_moe_layer
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


@dataclass
class KVCache:
    """One layer's keys and values of the positions seen so far (generation): k_BhSd, v_BhSd."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k_BhSd: torch.Tensor, v_BhSd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.k = k_BhSd if self.k is None else torch.cat([self.k, k_BhSd], dim=2)
        self.v = v_BhSd if self.v is None else torch.cat([self.v, v_BhSd], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads <= n_heads share K/V in groups).

    One fused projection holds rows [q (H*d) | k (Hkv*d) | v (Hkv*d)]; qkv_bias adds a bias to it
    (Qwen2). qk_norm: "head" = RMSNorm over each head's d features (Qwen3), "full" = over all of
    q's H*d and k's Hkv*d features (OLMoE), applied before the rotary rotation as those models do.
    Rotary pairs are interleaved (x[2i], x[2i+1]); Hugging Face checkpoints rotate half-split pairs
    (x[i], x[i+d/2]), so their q/k rows are permuted on conversion (moe_sys.weights.hf_state).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 qkv_bias: bool = False, qk_norm: str = "none", eps: float = 1e-5, proj_bias: bool = False,
                 causal: bool = True):
        """causal=False: every position sees every other (encoders: the ViT, which also has proj_bias)."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.causal = n_heads, n_kv_heads or n_heads, causal
        self.head_dim = head_dim or d_model // n_heads
        self.widths = (n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)
        self.qkv = nn.Linear(d_model, sum(self.widths), bias=qkv_bias)
        self.qkv.split_sizes = self.widths  # adapters on the fused projection (IA3) read where q ends
        self.proj = nn.Linear(self.widths[0], d_model, bias=proj_bias)
        self.qk_norm = qk_norm
        if qk_norm != "none":
            q_dim, k_dim = (self.head_dim, self.head_dim) if qk_norm == "head" else self.widths[:2]
            self.q_norm, self.k_norm = RMSNorm(q_dim, eps), RMSNorm(k_dim, eps)

    def _heads(self, x_BSD):
        """q_BHSd, k_BhSd, v_BhSd (h = n_kv_heads) with QK-norm applied."""
        B, S, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(self.widths, dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x_BSD, cos=None, sin=None, prefix_kv: Optional[Tuple[torch.Tensor, ...]] = None,
                cache: Optional[KVCache] = None, attn_bias: Optional[torch.Tensor] = None):
        """cos/sin None: no rotary positions (the ViT adds learned ones to its input).
        prefix_kv: (k_BHPd, v_BHPd, visible_BP), P extra key/value positions before the sequence that
        every query may attend to where visible (prefix tuning); they carry no rotary position.
        cache: the keys/values of earlier positions (generation); x_BSD continues after them.
        attn_bias: [B, 1, S, S] added to every head's attention logits (task-adapted attention; encoders
        only, without prefix_kv: an attention is wrapped by one of the two adapters, never both)."""
        B, S, _ = x_BSD.shape
        q, k, v = self._heads(x_BSD)
        start = cache.length if cache is not None else 0
        if cos is not None:
            cos, sin = cos[start:start + S], sin[start:start + S]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if prefix_kv is None:
            # after a cached prefix, query s sees every earlier position and the new ones up to s
            mask_SK = None if start == 0 else torch.ones(S, start + S, dtype=torch.bool, device=q.device).tril(start)
            mask = attn_bias if attn_bias is not None else mask_SK
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and start == 0, attn_mask=mask)
        else:
            k_p, v_p, visible_BP = prefix_kv
            causal_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device)
            causal_SS = causal_SS.tril() if self.causal else causal_SS
            mask_B1SK = torch.cat([visible_BP[:, None, None, :].expand(B, 1, S, -1), causal_SS.expand(B, 1, S, S)], -1)
            out = F.scaled_dot_product_attention(q, torch.cat([k_p, k], 2), torch.cat([v_p, v], 2), attn_mask=mask_B1SK)
        return self.proj(out.transpose(1, 2).reshape(B, S, -1))


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


def attention_from_config(cfg) -> Attention:
    """The attention a ModelConfig asks for."""
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm attention + FFN. checkpointed (``train.activation_checkpointing: full``): its
    activations are recomputed in the backward pass (moe_sys.moe.recompute)."""

    checkpoint_unit = "block"
    checkpointed = False

    def __init__(self, d_model: int, attn: Attention, ffn: nn.Module, eps: float):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(d_model, eps), attn
        self.ffn_norm, self.ffn = RMSNorm(d_model, eps), ffn

    def forward(self, x_BSD, cos, sin, ctx: RoutingContext, cache: Optional[KVCache] = None):
        if self.checkpointed and self.training and cache is None:
            # The recompute runs in the backward pass, outside the forward's batch_scope: re-enter it.
            return recompute.run(lambda x: self._scoped(x, cos, sin, ctx), x_BSD)
        return self._forward(x_BSD, cos, sin, ctx, cache)

    def _scoped(self, x_BSD, cos, sin, ctx: RoutingContext):
        with batch_scope(ctx):
            return self._forward(x_BSD, cos, sin, ctx)

    def _forward(self, x_BSD, cos, sin, ctx: RoutingContext, cache: Optional[KVCache] = None):
        h_BSD = self.attn_norm(x_BSD)
        x_BSD = x_BSD + (self.attn(h_BSD, cos, sin) if cache is None else self.attn(h_BSD, cos, sin, cache=cache))
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
            Block(cfg.d_model, attention_from_config(cfg), self._ffn(i, cfg, moe_cfg, num_domains), cfg.norm_eps)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.head_dim or cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init(cfg.init_std)

    @staticmethod
    def _ffn(i: int, cfg, moe_cfg, num_domains: int) -> nn.Module:
        if not moe_cfg.is_moe_layer(i):
            return SwiGLU(cfg.d_model, cfg.d_ff)
        return build_moe_layer(cfg.d_model, cfg.d_ff, moe_cfg, cfg.init_std, num_domains)

    def _init(self, std: float):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)

    def moe_layers(self) -> List[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, tokens_BS: torch.Tensor, domain_B: Optional[torch.Tensor] = None,
                mask_BS: Optional[torch.Tensor] = None, caches: Optional[List[KVCache]] = None) -> LMOutput:
        """domain_B / mask_BS reach the routers (example- and task-level routing, padding);
        caches: one KVCache per layer when generating (tokens_BS continue the cached positions)."""
        x = self.embed(tokens_BS)
        ctx = RoutingContext(tuple(tokens_BS.shape), domain_B, mask_BS)
        routings = []
        with batch_scope(ctx):
            for i, layer in enumerate(self.layers):
                x, routing = layer(x, self.rope_cos, self.rope_sin, ctx, caches[i] if caches is not None else None)
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
