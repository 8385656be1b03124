"""State-dict mapping between a moe_sys TransformerLM and a Hugging Face checkpoint of a Family.

Legend: E experts, D model dim, F expert hidden dim, H heads, h key/value heads, d head dim.

  attention  moe_sys fuses rows [q (H*d) | k (h*d) | v (h*d)] in one ``qkv``; HF keeps q/k/v_proj.
             moe_sys rotates interleaved pairs (x[2i], x[2i+1]), HF half-split pairs (x[i], x[i+d/2]):
             q and k rows (and their biases and QK-norm weights) are permuted per head, which is exact.
  experts    moe_sys stacks input-major banks [E, D, F] / [E, F, D]; HF stores per expert [F, D] / [D, F]
             on disk (``experts.{e}.gate_proj``), or fused [E, 2F, D] ``gate_up_proj`` + [E, D, F]
             ``down_proj`` (``unfuse`` turns that into the per-expert layout first).

Both directions read one table of rules (``Mapper.rules``): each rule names a moe_sys key, the HF
keys it comes from and a kind whose pair of functions joins and splits them.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, List, Tuple

import torch

State = Dict[str, torch.Tensor]
Rule = Tuple[str, List[str], str]  # (moe_sys key, HF keys, kind)


def half_to_interleaved(d: int) -> torch.Tensor:
    """Index p with ours[j] = hf[p[j]] inside one head: ours[2i] = hf[i], ours[2i+1] = hf[i + d/2]."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()


def permute_heads(t: torch.Tensor, d: int, index: torch.Tensor) -> torch.Tensor:
    """Permute the d features of every head (rows of a weight, entries of a bias or norm weight)."""
    return t.reshape(t.shape[0] // d, d, *t.shape[1:])[:, index].reshape(t.shape)


class Mapper:
    """from_hf / to_hf for one moe_sys Config and Family."""

    def __init__(self, cfg, family):
        m = cfg.model
        self.cfg, self.family = cfg, family
        self.d = m.head_dim or m.d_model // m.n_heads
        kv = (m.n_kv_heads or m.n_heads) * self.d
        self.widths = [m.n_heads * self.d, kv, kv]
        self.to_ours = half_to_interleaved(self.d)
        self.to_hf_index = torch.argsort(self.to_ours)
        rope_in = lambda t: permute_heads(t, self.d, self.to_ours)  # noqa: E731
        rope_out = lambda t: permute_heads(t, self.d, self.to_hf_index)  # noqa: E731
        self.kinds: Dict[str, Tuple[Callable, Callable]] = {
            "copy": (lambda ts: ts[0], lambda t: [t]),
            "rope": (lambda ts: rope_in(ts[0]), lambda t: [rope_out(t)]),
            "qkv": (lambda ts: torch.cat([rope_in(ts[0]), rope_in(ts[1]), ts[2]]),
                    lambda t: [rope_out(p) if i < 2 else p for i, p in enumerate(t.split(self.widths))]),
            "stack_t": (lambda ts: torch.stack([w.t() for w in ts]), lambda t: [w.t() for w in t.unbind(0)]),
        }

    def rules(self) -> Iterator[Rule]:
        m = self.cfg.model
        yield "embed.weight", ["model.embed_tokens.weight"], "copy"
        yield "norm.weight", ["model.norm.weight"], "copy"
        if not m.tie_embeddings:
            yield "head.weight", ["lm_head.weight"], "copy"
        for i in range(m.n_layers):
            yield from self._attention_rules(i)
            yield from self._ffn_rules(i)

    def _attention_rules(self, i: int) -> Iterator[Rule]:
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        a = src + "self_attn."
        yield dst + "attn_norm.weight", [src + "input_layernorm.weight"], "copy"
        yield dst + "ffn_norm.weight", [src + "post_attention_layernorm.weight"], "copy"
        yield dst + "attn.qkv.weight", [f"{a}{n}_proj.weight" for n in "qkv"], "qkv"
        if self.cfg.model.qkv_bias:
            yield dst + "attn.qkv.bias", [f"{a}{n}_proj.bias" for n in "qkv"], "qkv"
        yield dst + "attn.proj.weight", [a + "o_proj.weight"], "copy"
        if self.cfg.model.qk_norm != "none":
            for n in "qk":
                yield f"{dst}attn.{n}_norm.weight", [f"{a}{n}_norm.weight"], "rope"

    def _ffn_rules(self, i: int) -> Iterator[Rule]:
        src, dst = f"model.layers.{i}.", f"layers.{i}.ffn."
        if not self.cfg.moe.is_moe_layer(i):
            for n in ("gate", "up", "down"):
                yield f"{dst}{n}.weight", [f"{src}mlp.{n}_proj.weight"], "copy"
            return
        p = f"{src}{self.family.moe_prefix}."
        yield dst + "router.gate.weight", [p + "gate.weight"], "copy"
        experts = range(self.cfg.moe.num_experts)
        for ours, theirs in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"), self.family.expert_names):
            yield f"{dst}experts.{ours}", [f"{p}experts.{e}.{theirs}.weight" for e in experts], "stack_t"
        if self.cfg.moe.shared_experts:
            for ours, n in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"), ("gate", "up", "down")):
                yield f"{dst}shared.{ours}", [f"{p}shared_expert.{n}_proj.weight"], "stack_t"
            yield dst + "shared_gate.weight", [p + "shared_expert_gate.weight"], "copy"

    def from_hf(self, hf: State) -> State:
        """Every HF key must be used (``unused`` says which were not); tied heads share the embedding."""
        ours = {key: self.kinds[kind][0]([hf[h] for h in theirs]) for key, theirs, kind in self.rules()}
        if self.cfg.model.tie_embeddings:
            ours["head.weight"] = ours["embed.weight"]
        return ours

    def to_hf(self, ours: State) -> State:
        hf = {}
        for key, theirs, kind in self.rules():
            hf.update(zip(theirs, (t.contiguous() for t in self.kinds[kind][1](ours[key]))))
        return hf

    def hf_keys(self) -> Dict[str, str]:
        """HF key -> the moe_sys key it maps to."""
        return {h: key for key, theirs, _ in self.rules() for h in theirs}


_IN_MEMORY = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate\.weight)$")
_FUSED = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")


def unfuse(hf: State, family, origin: Dict[str, str]) -> State:
    """Fused 3-D expert tensors (transformers' in-memory layout, saved by some checkpoints) -> per expert,
    under the family's on-disk MoE prefix.
    ``origin`` (key -> file) gains the new keys, each from its fused tensor's file."""
    out = {}
    gate, up, down = family.expert_names
    for key, t in hf.items():
        match = _FUSED.match(key)
        if match is None:
            renamed = _IN_MEMORY.sub(rf"\1.{family.moe_prefix}.\2", key)  # Mixtral's router as transformers names it
            out[renamed] = t
            origin[renamed] = origin[key]
            continue
        p = f"{match.group(1)}.{family.moe_prefix}.experts"
        if match.group(2) == "down_proj":
            pieces = {f"{p}.{e}.{down}.weight": w for e, w in enumerate(t.unbind(0))}
        else:
            pieces = {f"{p}.{e}.{n}.weight": w for e, pair in enumerate(t.unbind(0))
                      for n, w in zip((gate, up), pair.chunk(2, dim=0))}
        out.update(pieces)
        origin.update(dict.fromkeys(pieces, origin[key]))
    return out
