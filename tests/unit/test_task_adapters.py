"""VTAGML's task-conditioned adapters (TAA, TSN, conditional bottleneck) on the ViT, against their definitions."""
import pytest
import torch
import torch.nn.functional as F

from moe_sys.adapters import io
from moe_sys.adapters.inject import attach, inject
from moe_sys.adapters.task_conditioned import ConditionalBottleneck, TaskAdaptedAttention, TaskScaledNorm
from moe_sys.config.adapters import AdaptersConfig
from moe_sys.models.transformer import batch_scope
from moe_sys.models.vit import ViT
from moe_sys.moe.routing import RoutingContext
from tests.unit.test_vit import _images, vit_config

TASKS = ["seg", "depth", "normals"]
TAA = {"type": "task_attention", "name": "taa", "targets": ["blocks.2.attn", "blocks.3.attn"], "max_tokens": 20,
       "embed_dim": 8}
TSN = {"type": "task_norm", "name": "tsn", "targets": ["blocks.*.norm1", "blocks.*.norm2"], "embed_dim": 8}
CB = {"type": "conditional_bottleneck", "name": "cb", "targets": ["blocks.1", "blocks.2", "blocks.3"],
      "embed_dim": 8}
TASK_B = torch.tensor([0, 2, 1, 2])


def _model(*specs, seed=0):
    cfg = vit_config()
    torch.manual_seed(seed)
    model, base = ViT(cfg.model, cfg.moe), ViT(cfg.model, cfg.moe)
    base.load_state_dict(model.state_dict())
    layers = inject(model, AdaptersConfig(modules=list(specs)), TASKS)
    return model, base, layers


def _fill(layers, kind, names, seed=1):
    """Give the named parameters of every layer of ``kind`` random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.adapter_parameters():
                if isinstance(layer, kind) and any(name.endswith(n) for n in names):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_zero_matrix_and_zero_film_are_the_plain_encoder_exactly():
    model, base, layers = _model(TAA, TSN, CB)
    with torch.no_grad():  # pre-trained-like norms, so TSN's exactness is not that of weight 1 and bias 0
        for m in (model, base):
            torch.manual_seed(5)
            for ln in [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]:
                ln.weight.normal_(), ln.bias.normal_()
    x = _images(B=4)
    # TAA: a zero matrix with any gamma (beta = 0); TSN and CB: any task embedding with zero FiLM
    _fill(layers, TaskAdaptedAttention, ["embedding.weight"])
    _fill(layers, TaskScaledNorm, ["embedding.weight"])
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, TaskAdaptedAttention):
                layer.task.film.weight[:layer.columns].normal_()  # gamma rows of the FiLM; beta rows stay 0
        assert torch.equal(model(x, TASK_B).tokens_BSD, base(x, TASK_B).tokens_BSD)
    # with grad, CPU attention takes its math kernel for a mask that needs grad: rounding-level only
    assert torch.allclose(model(x, TASK_B).tokens_BSD, base(x, TASK_B).tokens_BSD, rtol=0, atol=1e-5)
    own = {id(p) for layer in layers for _, p in layer.adapter_parameters()}
    assert own and {id(p) for p in model.parameters() if p.requires_grad} == own  # the base is frozen


def _vtagml_taa(layer, task_B, blocks):
    """IVRL/VTAGML conditional_modules.TAA.forward on the same parameters (torch.block_diag per example)."""
    gb = layer.task.film(layer.task.embedding(task_B)).unsqueeze(1)
    gamma, beta = torch.chunk(gb, 2, dim=-1)
    out = (1 + gamma) * layer.matrix_TC + beta
    out = torch.stack([torch.block_diag(*list(o.chunk(blocks, 0))) for o in out])
    return out[:, :, :out.size(1)]


@pytest.mark.parametrize("blocks", [1, 3])
def test_taa_bias_is_vtagmls_and_is_added_to_every_heads_logits(blocks):
    model, _, layers = _model({**TAA, "blocks": blocks})
    _fill(layers, TaskAdaptedAttention, ["embedding.weight", "film.weight", "film.bias", "matrix_TC"])
    layer = model.blocks[2].attn
    S = 17  # class token + 16 patches
    expected = _vtagml_taa(layer, TASK_B, blocks)[:, :S, :S]
    bias = layer.bias(TASK_B, S)
    assert torch.allclose(bias[:, 0], expected, atol=1e-6)
    x = torch.randn(4, S, 32)
    attn = layer.base_layer
    q, k, v = attn.qkv(x).view(4, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / 8 ** 0.5 + expected[:, None]
    direct = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(4, S, 32))
    with batch_scope(RoutingContext((4, S), TASK_B)):
        assert torch.allclose(layer(x), direct, atol=1e-5)


def test_tsn_weight_is_film_of_the_layernorm_weight():
    model, _, layers = _model(TSN)
    _fill(layers, TaskScaledNorm, ["embedding.weight", "film.weight", "film.bias"])
    layer = model.blocks[0].norm1
    with torch.no_grad():
        layer.base_layer.weight.normal_(), layer.base_layer.bias.normal_()
    x = torch.randn(4, 5, 32)
    with batch_scope(RoutingContext((4, 5), TASK_B)):
        out = layer(x)
    for b, t in enumerate(TASK_B):  # VTAGML's TaskScaledNorm: F.layer_norm per task with the modulated weight
        gamma, beta = layer.task.film(layer.task.embedding(t)).chunk(2)
        w, ln = (1 + gamma) * layer.base_layer.weight + beta, layer.base_layer
        assert torch.allclose(out[b], F.layer_norm(x[b], (32,), w, ln.bias, ln.eps), atol=1e-5)


def test_conditional_bottleneck_carries_its_output_from_block_to_block():
    model, _, layers = _model(CB)
    _fill(layers, ConditionalBottleneck, ["embedding.weight", "transform.weight", "film.weight", "film.bias",
                                          "down.weight", "up.weight", "up.bias"])
    model.eval()
    x = _images(B=4)
    with torch.no_grad():
        got = model(x, TASK_B).tokens_BSD
        h, carry = model.embed(x), 0.0
        for i, wrapped in enumerate(model.blocks):
            block = wrapped.base_layer if i > 0 else wrapped
            y = block(h, None)[0]
            if i > 0:  # h_l = up(down(FiLM_t(x_l + h_{l-1}))); the block gives x_l + h_l
                e = wrapped.task.transform(wrapped.task.embedding(TASK_B))
                gamma, beta = wrapped.task.film(e).chunk(2, -1)
                carry = wrapped.up(wrapped.down((1 + gamma[:, None]) * (y + carry) + beta[:, None]))
                y = y + carry
            h = y
        assert torch.allclose(got, model.norm(h), atol=1e-5)


def test_tasks_change_the_output_once_parameters_are_trained():
    for spec, kind, names in [(TAA, TaskAdaptedAttention, ["embedding.weight", "film.weight", "matrix_TC"]),
                              (TSN, TaskScaledNorm, ["embedding.weight", "film.weight"]),
                              (CB, ConditionalBottleneck, ["embedding.weight", "film.weight", "up.weight"])]:
        model, base, layers = _model(spec)
        _fill(layers, kind, names)
        x = _images(B=1).expand(3, -1, -1, -1)  # one image under each task
        out = model(x, torch.tensor([0, 1, 2])).tokens_BSD
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2]), spec["type"]
        assert not torch.allclose(out[0], base(x[:1]).tokens_BSD[0]), spec["type"]


def test_task_ids_required_and_token_count_checked():
    model, _, _ = _model(TAA)
    with pytest.raises(ValueError, match="'taa' is conditioned on the task"):
        model(_images())
    small, _, _ = _model({**TAA, "max_tokens": 10})
    with pytest.raises(ValueError, match="17 tokens, more than its max_tokens=10"):
        small(_images(), torch.zeros(3, dtype=torch.int64))


def test_saved_adapters_reattach_to_a_fresh_encoder(tmp_path):
    model, _, layers = _model(TAA, TSN, CB)
    _fill(layers, TaskAdaptedAttention, ["embedding.weight", "film.weight", "matrix_TC"])
    _fill(layers, ConditionalBottleneck, ["film.weight", "up.weight"], seed=2)
    io.save_adapters(model, str(tmp_path))
    fresh, _, _ = _model()
    attach(fresh, str(tmp_path), TASKS)
    x = _images(B=4)
    with torch.no_grad():
        assert torch.equal(fresh(x, TASK_B).tokens_BSD, model(x, TASK_B).tokens_BSD)
