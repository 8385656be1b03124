"""PUMA's prompt pool (tjddus9597/PUMA-WACV25 models/prompt.py PromptPool, prompt_type pool, not deep):
M components, each a key K_m, an attention vector A_m and a prompt P_m of L tokens, mixed per image
into L prompt tokens inserted after the class token.

    q   = (mean_n x_n + max_n x_n) / 2                 patch embeddings before positions, detached
    a_m = cos(q * softmax(A_m), K_m)                   softmax over the D features of A_m
    prompt = sum_m a_m P_m                             a linear, not a softmax, mixture
    tokens = [cls ; prompt + pos_cls ; patches]        the prompts take the class token's position
                                                       (PUMA's resize_pos_embed copies it for them)
    loss (training) = coef * (ortho(K) + ortho(A) + ortho(P flattened to [M, L*D])),
    ortho(T) = mean((T T^T - I)^2)                     PUMA: 1e-6 inside ortho times prompt_lambda 1

Differences, on purpose: PUMA passes a_m through a BatchNorm1d(affine=False) it keeps in eval mode with
fresh running statistics, i.e. a_m / sqrt(1 + 1e-5); we leave out that constant factor. PUMA's init
copies the first component's orthogonal prompt into all M (they start equal); we draw the [M, L*D]
prompt matrix orthogonal, the state its penalty asks for, so the components differ from the start.
The loss travels in ``VisionOutput.losses`` (name ``prompt_ortho``), already weighted, for the task's
loss to add, as router losses travel in RouterOutput.

Legend: B images, N patches, D model dim, M components, L prompt length.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_sys.adapters.base import AdapterLayer, register_adapter
from moe_sys.models.vit import PatchEmbedding


def ortho_penalty(t_MX: torch.Tensor) -> torch.Tensor:
    """mean((T T^T - I)^2) over the M x M Gram matrix of the rows of T."""
    eye = torch.eye(t_MX.shape[0], device=t_MX.device, dtype=t_MX.dtype)
    return ((t_MX @ t_MX.T - eye) ** 2).mean()


class PromptPool(AdapterLayer):
    """Wraps the ViT's PatchEmbedding; returns (tokens_BSD with L more tokens, losses)."""

    def __init__(self, base_layer: PatchEmbedding, name: str, components: int = 20, length: int = 8,
                 ortho_coef: float = 1e-6):
        super().__init__(base_layer, name)
        D = self.embedding_dim = base_layer.embedding_dim  # it is the model's embedding now
        self.keys_MD = nn.Parameter(nn.init.orthogonal_(torch.empty(components, D)))
        self.attention_MD = nn.Parameter(nn.init.orthogonal_(torch.empty(components, D)))
        self.prompts_MLD = nn.Parameter(nn.init.orthogonal_(torch.empty(components, length * D)).view(components,
                                                                                                    length, D))
        self.ortho_coef = ortho_coef

    def weights(self, x_BND: torch.Tensor) -> torch.Tensor:
        """a_BM: cosine of each image's attended query with each key."""
        q_BD = ((x_BND.mean(1) + x_BND.amax(1)) / 2).detach()
        aq_BMD = q_BD[:, None, :] * F.softmax(self.attention_MD, dim=1)[None]
        return torch.einsum("bmd,md->bm", F.normalize(aq_BMD, dim=2), F.normalize(self.keys_MD, dim=1))

    def penalty(self) -> torch.Tensor:
        return ortho_penalty(self.keys_MD) + ortho_penalty(self.attention_MD) + ortho_penalty(
            self.prompts_MLD.flatten(1))

    def forward(self, images_BCHW: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        embed = self.base_layer
        x_BND = embed.patches(images_BCHW)
        prompt_BLD = torch.einsum("bm,mld->bld", self.weights(x_BND), self.prompts_MLD) + embed.pos_embed[:, :1]
        tokens_BSD = embed.tokens(x_BND)
        tokens_BSD = torch.cat([tokens_BSD[:, :1], prompt_BLD, tokens_BSD[:, 1:]], dim=1)
        losses = {"prompt_ortho": self.ortho_coef * self.penalty()} if self.training else {}
        return tokens_BSD, losses


@register_adapter("prompt_pool", wraps=PatchEmbedding)
def build(base_layer: PatchEmbedding, spec, site) -> PromptPool:
    return PromptPool(base_layer, spec.name, spec.components, spec.length, spec.ortho_coef)
