"""PUMA's adapters on the ViT: sub-layer stochastic adapters and the prompt pool, against their definitions."""
import pytest
import torch
import torch.nn.functional as F

from moe_sys.adapters import io
from moe_sys.adapters.inject import attach, inject
from moe_sys.adapters.prompt_pool import PromptPool
from moe_sys.adapters.stochastic import PumaAdapter
from moe_sys.config.adapters import AdaptersConfig
from moe_sys.models.vit import ViT
from tests.unit.test_vit import _images, vit_config

PUMA = {"type": "puma", "name": "puma", "dim": 8}
POOL = {"type": "prompt_pool", "name": "pool", "components": 5, "length": 3}


def _model(*specs, seed=0):
    cfg = vit_config(n_layers=2)
    torch.manual_seed(seed)
    model = ViT(cfg.model, cfg.moe)
    base = ViT(cfg.model, cfg.moe)
    base.load_state_dict(model.state_dict())
    layers = inject(model, AdaptersConfig(modules=list(specs)), ["a", "b"]) if specs else []
    return model, base, layers


def _randomize_up(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, PumaAdapter):
                layer.bank.up_NRO.copy_(torch.randn(layer.bank.up_NRO.shape, generator=g))


def test_two_adapters_per_block_frozen_base_identity_at_init():
    model, base, layers = _model(PUMA)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, PumaAdapter)) == [
        "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".attn.bank." in n or ".mlp.bank." in n for n in trainable)
    assert not any("bias" in n for n in trainable)  # PUMA's adapter has no biases
    x = _images()
    for mode in (True, False):
        model.train(mode), base.train(mode)
        assert torch.equal(model(x).features_BD, base(x).features_BD)  # up is zero: exactly the frozen ViT


def test_each_adapter_reads_its_sublayers_normalised_input_at_eval():
    """block: x1 = x + attn(n1) + 0.1 a1(n1), n1 = norm1(x); out = x1 + mlp(n2) + 0.1 a2(n2), n2 = norm2(x1)."""
    model, _, layers = _model(PUMA)
    _randomize_up(layers)
    model.eval()
    block = model.blocks[0]
    x = model.embed(_images())

    def adapter(site, n):
        bank = site.bank
        return 0.1 * (F.relu(n @ bank.down_NIR[0]) @ bank.up_NRO[0])

    n1 = block.norm1(x)
    x1 = x + block.attn.base_layer(n1) + adapter(block.attn, n1)
    n2 = block.norm2(x1)
    expected = x1 + block.mlp.base_layer(n2) + adapter(block.mlp, n2)
    y, _ = block(x, None)
    assert torch.allclose(y, expected, atol=1e-6)
    assert (adapter(block.attn, n1)).abs().max() > 1e-3
    assert torch.equal(model(_images()).features_BD, model(_images()).features_BD)  # no dropping at eval


def test_per_example_drop_rate_rescaling_and_independent_sites():
    model, _, layers = _model(PUMA)
    _randomize_up(layers)
    site = model.blocks[0].attn
    n = torch.randn(4000, 2, 32, generator=torch.Generator().manual_seed(3))
    base = site.base_layer(n)
    site.eval()
    full = site(n) - base
    site.train()
    torch.manual_seed(4)
    got = site(n) - base
    on = (got.abs().amax((1, 2)) > 0)
    assert abs(on.float().mean() - 0.5) < 5 * (0.25 / 4000) ** 0.5  # Bernoulli(1 - 0.5), 5 sigma
    assert torch.allclose(got[on], full[on] / 0.5, atol=1e-6)  # kept: rescaled by 1/(1-p), the whole example
    other = model.blocks[0].mlp
    on2 = ((other(n) - other.base_layer(n)).abs().amax((1, 2)) > 0)
    both = (on & on2).float().mean()
    assert abs(both - 0.25) < 5 * (0.1875 / 4000) ** 0.5  # the two sites draw independently


def test_prompt_pool_tokens_weights_and_penalty_against_their_formulas():
    model, _, layers = _model(POOL)
    pool = layers[0]
    assert isinstance(pool, PromptPool) and model.embed is pool
    images = _images()
    pool.train()
    tokens, losses = pool(images)
    assert tokens.shape == (3, 1 + 3 + 16, 32)
    embed = pool.base_layer
    patches = embed.patches(images)
    q = (patches.mean(1) + patches.max(1).values) / 2
    for b in range(3):
        a = [F.cosine_similarity(q[b] * torch.softmax(pool.attention_MD[m], 0), pool.keys_MD[m], dim=0) for m in range(5)]
        prompt = sum(a[m] * pool.prompts_MLD[m] for m in range(5)) + embed.pos_embed[0, 0]
        assert torch.allclose(tokens[b, 1:4], prompt, atol=1e-5)
    plain = embed(images)
    assert torch.equal(tokens[:, :1], plain[:, :1]) and torch.equal(tokens[:, 4:], plain[:, 1:])

    def ortho(t):
        M = t.shape[0]
        return sum((t[i] @ t[j] - float(i == j)) ** 2 for i in range(M) for j in range(M)) / M ** 2

    with torch.no_grad():
        pool.keys_MD.add_(0.1 * torch.randn_like(pool.keys_MD))  # off the orthogonal init
    expected = 1e-6 * (ortho(pool.keys_MD) + ortho(pool.attention_MD) + ortho(pool.prompts_MLD.flatten(1)))
    _, losses = pool(images)
    assert torch.allclose(losses["prompt_ortho"], expected, rtol=1e-5) and expected > 0
    model.train()
    assert torch.allclose(model(images).losses["prompt_ortho"], expected, rtol=1e-5)  # travels in VisionOutput
    model.eval()
    assert model(images).losses == {}  # a training loss only, as in PUMA


def test_prompt_query_is_detached_and_only_the_pool_trains():
    model, _, layers = _model(POOL, PUMA)
    model.train()
    out = model(_images())
    (out.features_BD.sum() + sum(out.losses.values())).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert layers[0].keys_MD.grad is not None and layers[0].prompts_MLD.grad.abs().max() > 0


def test_adapters_saved_alone_and_reattached(tmp_path):
    model, _, layers = _model(PUMA, POOL)
    _randomize_up(layers)
    io.save_adapters(model, str(tmp_path))
    manifest = io.read_manifest(str(tmp_path))
    assert sorted(s.type for s in manifest["specs"]) == ["prompt_pool", "puma"]
    assert all("base_layer" not in k for k in io.adapter_state_dict(model))
    fresh, _, _ = _model()
    attach(fresh, str(tmp_path), ["a", "b"])
    model.eval(), fresh.eval()
    assert torch.equal(fresh(_images()).features_BD, model(_images()).features_BD)


def test_whole_block_stochastic_adapter_also_wraps_vit_blocks():
    model, base, layers = _model({"type": "stochastic", "name": "blockwise", "targets": ["blocks.*"], "dim": 8})
    assert [type(m.base_layer).__name__ for m in layers] == ["ViTBlock", "ViTBlock"]
    x = _images()
    assert torch.equal(model(x).features_BD, base(x).features_BD)  # zero up projection: the frozen ViT
    with torch.no_grad():
        layers[0].bank.up_NRO.normal_()
    model.eval()
    assert (model(x).features_BD - base.eval()(x).features_BD).abs().max() > 1e-3


def test_adapter_expert_mixtures_wrap_the_vit_mlp_with_bottleneck_experts():
    expert = {"kind": "bottleneck", "rank": 4, "activation": "relu", "scale": 0.1}
    for spec in ({"type": "mixture", "name": "moa", "targets": ["blocks.*.mlp"], "num_experts": 4, "top_k": 2,
                  "expert": expert},
                 {"type": "smear", "name": "smear", "targets": ["blocks.*.mlp"], "num_experts": 4, "segments": 1,
                  "allow_noncausal": True, "expert": expert}):
        model, base, layers = _model(spec)
        x = _images()
        out = model(x)
        assert len(out.routings) == 2 and torch.equal(out.features_BD, base(x).features_BD)  # zero up: the ViT
        with torch.no_grad():
            for layer in layers:
                layer.experts.bank.up_NRO.normal_()
        assert (model(x).features_BD - base(x).features_BD).abs().max() > 1e-3
    with pytest.raises(TypeError, match="use expert.kind: bottleneck"):
        _model({**spec, "expert": {"kind": "lora"}})
