"""Task-conditioned adapters of VTAGML (Bhattacharjee, Suesstrunk, Salzmann, "Vision Transformer
Adapters for Generalizable Multitask Learning", ICCV 2023; code IVRL/VTAGML, script/model/
conditional_modules.py and swin_transformer.py).

Each example's task id is its domain id in the batch's routing context (``current_batch().domain_B``,
as per-domain LoRA/PUMA slots read it). A learned task embedding e_t drives FiLM, ``(1 + gamma) x +
beta`` with (gamma, beta) = W e_t + b:

  task_attention          (TAA) wraps an attention: adds the task-dependent bias A_t = (1 + gamma_t) M
                          + beta_t to the logits of every head; M [T, C] starts at zero, FiLM acts on
                          its C columns; ``blocks`` > 1 makes A_t block-diagonal (rows cut into chunks
                          of C = ceil(T / blocks), chunk k placed at columns k C...), as VTAGML's
                          torch.block_diag; cropped to the S tokens of the batch.
  task_norm               (TSN) wraps a LayerNorm: its weight becomes (1 + gamma_t) w + beta_t (the
                          bias stays the base's).
  conditional_bottleneck  wraps a block: h_l = up(down(FiLM_t(x_l + h_{l-1}))), x_l the block output,
                          h_{l-1} the previous conditioned block's h (zero for the first), carried in
                          the routing context; the block returns x_l + scale * h_l.

Differences from VTAGML, on purpose:
- the FiLM layers (and the bottleneck's up projection) start at zero, so every adapter starts as
  the frozen encoder exactly (VTAGML initialises the FiLM weights randomly and only zeroes their
  bias, so its TAA bias beta_t and its side network are non-zero from the first step);
- each adapter layer owns its task embedding (VTAGML shares one across the model); a shared module
  would be saved under many names, and a per-layer embedding followed by a linear FiLM can express
  everything the shared one can;
- VTAGML's bottleneck output *replaces* the encoder output at the end of the carry chain (a side
  network); here each h_l is added to its block's output, which keeps the frozen path intact and
  needs no model hook; TSN keeps the base bias (VTAGML trains a fresh one).

Exactness: at init (or with M = 0 and beta = 0) TAA adds an exact zero to the logits, but CPU
scaled_dot_product_attention picks its math kernel for a mask that requires grad instead of the flash
kernel the plain attention uses: equal bit for bit without grad (inference), to ~1e-7 in training.

Legend: B examples, S tokens, D model dim, T max tokens, C TAA matrix columns, E task embedding dim,
K FiLM features, R bottleneck width.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.adapters.base import AdapterLayer, register_adapter
from moe_sys.models.transformer import Attention, Block, current_batch
from moe_sys.models.vit import ViTBlock


def task_ids(adapter: str, device) -> torch.Tensor:
    """The task (= domain) id of every example of the forward pass in progress."""
    ctx = current_batch()
    if ctx is None or ctx.domain_B is None:
        raise ValueError(f"adapter {adapter!r} is conditioned on the task, but the forward pass got no task "
                         "(domain) ids")
    return ctx.domain_B.to(device)


class TaskFiLM(nn.Module):
    """A learned embedding per task and the FiLM (gamma, beta) [B, K] it gives each example (zero at init).
    ``transform``: a Linear on the embedding first (VTAGML's ConditionalBottleNeck.emb_transf)."""

    def __init__(self, num_tasks: int, embed_dim: int, features: int, transform: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(num_tasks, embed_dim)
        self.transform = nn.Linear(embed_dim, embed_dim) if transform else nn.Identity()
        self.film = nn.Linear(embed_dim, 2 * features)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, task_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        gamma_BK, beta_BK = self.film(self.transform(self.embedding(task_B))).chunk(2, dim=-1)
        return gamma_BK, beta_BK


class TaskAdaptedAttention(AdapterLayer):
    def __init__(self, base_layer: Attention, name: str, num_tasks: int, embed_dim: int, max_tokens: int,
                 blocks: int = 1):
        super().__init__(base_layer, name)
        self.columns = math.ceil(max_tokens / blocks)
        self.task = TaskFiLM(num_tasks, embed_dim, self.columns)
        self.matrix_TC = nn.Parameter(torch.zeros(max_tokens, self.columns))

    def bias(self, task_B: torch.Tensor, S: int) -> torch.Tensor:
        """A_t for each example, [B, 1, S, S]: (1 + gamma) M + beta laid out block-diagonally, cropped."""
        T, C = self.matrix_TC.shape
        if S > T:
            raise ValueError(f"adapter {self.adapter_name!r}: the batch has {S} tokens, more than its max_tokens={T}")
        gamma_BC, beta_BC = self.task(task_B)
        film_BSC = (1 + gamma_BC[:, None]) * self.matrix_TC[:S] + beta_BC[:, None]
        pos_S = torch.arange(S, device=task_B.device)
        same_block_SS = (pos_S[:, None] // C) == (pos_S[None, :] // C)
        bias_BSS = film_BSC[:, :, pos_S % C] * same_block_SS
        return bias_BSS[:, None]

    def forward(self, x_BSD: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
        bias_B1SS = self.bias(task_ids(self.adapter_name, x_BSD.device), x_BSD.shape[1])
        return self.base_layer(x_BSD, cos, sin, attn_bias=bias_B1SS)


class TaskScaledNorm(AdapterLayer):
    def __init__(self, base_layer: nn.LayerNorm, name: str, num_tasks: int, embed_dim: int):
        super().__init__(base_layer, name)
        self.task = TaskFiLM(num_tasks, embed_dim, base_layer.normalized_shape[-1])

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """One fused layer_norm per task present (as VTAGML): with zero FiLM it is the base norm bit for bit,
        which normalising first and scaling per example afterwards is not."""
        base, task_B = self.base_layer, task_ids(self.adapter_name, x_BSD.device)
        out_BSD = torch.empty_like(x_BSD)
        for task in task_B.unique():
            rows_B = task_B == task
            gamma_1D, beta_1D = self.task(task[None])
            weight_D = ((1 + gamma_1D) * base.weight + beta_1D)[0]
            out_BSD[rows_B] = F.layer_norm(x_BSD[rows_B], base.normalized_shape, weight_D, base.bias, base.eps)
        return out_BSD


class ConditionalBottleneck(AdapterLayer):
    def __init__(self, base_layer: nn.Module, name: str, num_tasks: int, embed_dim: int, d_model: int,
                 dim: int, scale: float = 1.0):
        super().__init__(base_layer, name)
        self.task = TaskFiLM(num_tasks, embed_dim, d_model, transform=True)
        self.down, self.up = nn.Linear(d_model, dim), nn.Linear(dim, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x_BSD: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x_BSD, *args, **kwargs)
        y_BSD = out[0] if isinstance(out, tuple) else out
        ctx = current_batch()
        gamma_BD, beta_BD = self.task(task_ids(self.adapter_name, x_BSD.device))
        z_BSD = y_BSD + ctx.carry.get(self.adapter_name, 0.0)
        h_BSD = self.up(self.down((1 + gamma_BD[:, None]) * z_BSD + beta_BD[:, None]))
        ctx.carry[self.adapter_name] = h_BSD
        y_BSD = y_BSD + self.scale * h_BSD
        return (y_BSD, *out[1:]) if isinstance(out, tuple) else y_BSD


@register_adapter("task_attention", wraps=Attention)
def build_attention(base_layer: Attention, spec, site) -> TaskAdaptedAttention:
    if base_layer.causal:
        raise TypeError(f"adapter {spec.name!r}: {site.path} is causal attention; task_attention adds a bias to "
                        "non-causal (encoder) attention only")
    return TaskAdaptedAttention(base_layer, spec.name, site.num_domains, spec.embed_dim, spec.max_tokens, spec.blocks)


@register_adapter("task_norm", wraps=nn.LayerNorm)
def build_norm(base_layer: nn.LayerNorm, spec, site) -> TaskScaledNorm:
    return TaskScaledNorm(base_layer, spec.name, site.num_domains, spec.embed_dim)


@register_adapter("conditional_bottleneck", wraps=(ViTBlock, Block))
def build_bottleneck(base_layer: nn.Module, spec, site) -> ConditionalBottleneck:
    return ConditionalBottleneck(base_layer, spec.name, site.num_domains, spec.embed_dim, site.d_model,
                                 spec.dim or max(1, site.d_model // 3), spec.scale)
