"""Vision Transformer encoder (Dosovitskiy et al. 2021) whose FFN slots may be MoE (V-MoE, Riquelme et al. 2021).

Pre-norm blocks with LayerNorm, the LM's Attention without rotary positions and without a causal mask,
and GELU MLPs; a class token and learned absolute positions. Module names follow timm's ViT
(``embed.proj``, ``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``), so
pre-trained weights map almost one to one (moe_sys/weights/vit_timm.py, vit_hf.py) and adapter
targets read like PUMA's sites (``blocks.*.attn``, ``blocks.*.mlp``). MoE blocks sit where the LM puts
them (``moe.every`` / ``moe.first_moe_layer``), are built by the same ``build_moe_layer`` and are
expert-parallel the same way (moe_sys.parallel shards every MoELayer it finds).

Legend: B batch, C channels, P patch side, N patches, S tokens (class token, any inserted prompt
tokens, then the N patches), D model dim, F MLP hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.models.transformer import Attention, batch_scope, returns_routing
from moe_sys.moe.layer import MoELayer, build_moe_layer, is_moe_layer
from moe_sys.moe.routing import RouterOutput, RoutingContext


class PatchEmbedding(nn.Module):
    """Images -> [class token ; patch tokens], each plus its learned position (timm's layout: the class
    token has a position too). ``patches`` and ``tokens`` are separate steps so a prompt adapter can read
    the raw patch embeddings and insert tokens between them."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, d_model: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"model.vit.image_size: {image_size} is not divisible by model.vit.patch_size={patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.image_shape = (in_channels, image_size, image_size)
        self.embedding_dim = d_model  # the model width adapters are built for (as nn.Embedding names it)
        self.proj = nn.Conv2d(in_channels, d_model, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, d_model))

    def patches(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """x_BND: one embedding per patch, row-major, before positions."""
        if tuple(images_BCHW.shape[1:]) != self.image_shape:
            raise ValueError(f"images are {'x'.join(map(str, images_BCHW.shape[1:]))} (C x H x W), the ViT expects "
                             f"{'x'.join(map(str, self.image_shape))} (model.vit.in_channels, image_size)")
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)

    def tokens(self, x_BND: torch.Tensor) -> torch.Tensor:
        cls_B1D = self.cls_token.expand(x_BND.shape[0], -1, -1)
        return torch.cat([cls_B1D, x_BND], dim=1) + self.pos_embed

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.patches(images_BCHW))


class MLP(nn.Module):
    """fc2(GELU(fc1 x)), with biases (timm's Mlp, HF's intermediate/output)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp: nn.Module, eps: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = Attention(d_model, n_heads, qkv_bias=qkv_bias, proj_bias=True, causal=False)
        self.norm2, self.mlp = nn.LayerNorm(d_model, eps=eps), mlp

    def forward(self, x_BSD: torch.Tensor, ctx: RoutingContext):
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD))
        if returns_routing(self.mlp):
            h, routing = self.mlp(self.norm2(x_BSD), ctx)
            return x_BSD + h, routing
        return x_BSD + self.mlp(self.norm2(x_BSD)), None


@dataclass
class VisionOutput:
    features_BD: torch.Tensor  # final-normed class token, or the final norm of the patch tokens' mean
    tokens_BSD: torch.Tensor  # every token after the final norm
    routings: List[RouterOutput]  # one per MoE layer, in depth order
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # weighted extra losses (prompt pool) to add


class ViT(nn.Module):
    def __init__(self, cfg, moe_cfg, num_domains: int = 1):
        """cfg: ModelConfig (arch vit; its ``vit`` section); moe_cfg: MoEConfig (which MLPs are MoE);
        num_domains: distinct domain ids in batches (task-level routing and the MI loss need it)."""
        super().__init__()
        v = cfg.vit
        self.embed = PatchEmbedding(v.image_size, v.patch_size, v.in_channels, cfg.d_model)
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.d_model, cfg.n_heads, self._mlp(i, cfg, moe_cfg, num_domains), cfg.norm_eps, v.qkv_bias)
            for i in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.pool = v.pool
        self._init(cfg.init_std)

    @staticmethod
    def _mlp(i: int, cfg, moe_cfg, num_domains: int) -> nn.Module:
        if not is_moe_layer(i, moe_cfg):
            return MLP(cfg.d_model, cfg.d_ff)
        return build_moe_layer(cfg.d_model, cfg.d_ff, moe_cfg, cfg.init_std, num_domains)

    def _init(self, std: float):
        """Weights N(0, std), biases 0, LayerNorms 1/0 (their defaults); positions N(0, std), class token 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed.pos_embed, std=std)

    def moe_layers(self) -> List[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def forward(self, images_BCHW: torch.Tensor, domain_ids_B: Optional[torch.Tensor] = None) -> VisionOutput:
        """domain_ids_B reach the routers and per-domain adapters (as the LM's domain_B)."""
        out = self.embed(images_BCHW)
        x_BSD, losses = out if isinstance(out, tuple) else (out, {})  # a prompt adapter also returns its loss
        ctx = RoutingContext(tuple(x_BSD.shape[:2]), domain_ids_B)
        routings = []
        with batch_scope(ctx):
            for block in self.blocks:
                x_BSD, routing = block(x_BSD, ctx)
                if routing is not None:
                    routings.append(routing)
        tokens_BSD = self.norm(x_BSD)
        if self.pool == "cls":
            features_BD = tokens_BSD[:, 0]
        else:  # timm's avg pool: mean of the patch tokens (never the class or prompt tokens), then the norm
            features_BD = self.norm(x_BSD[:, -self.embed.num_patches:].mean(1))
        return VisionOutput(features_BD, tokens_BSD, routings, losses)


def build_vit(cfg, num_domains: int = 1) -> ViT:
    """The ViT of a whole Config (model.arch: vit), with ``model.vit.pretrained`` weights loaded."""
    model = ViT(cfg.model, cfg.moe, num_domains)
    if cfg.model.vit.pretrained:
        from moe_sys.weights.vit import load_pretrained  # weight formats stay out of model code until asked for

        load_pretrained(model, cfg.model, cfg.model.vit.pretrained)
    return model
