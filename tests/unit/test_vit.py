"""The ViT encoder: shapes, pooling, non-causal attention, MoE slots where the LM puts them, one-line errors."""
import pytest
import torch

from moe_sys.config import ConfigError, load_config
from moe_sys.config.schema import Config
from moe_sys.models.vit import MLP, ViT
from moe_sys.moe.layer import MoELayer


def vit_config(**model):
    vit = {"image_size": 16, "patch_size": 4, "in_channels": 1, **model.pop("vit", {})}
    moe = model.pop("moe", {"enabled": False})
    return Config.model_validate({"model": {"arch": "vit", "d_model": 32, "n_layers": 4, "n_heads": 4, "d_ff": 64,
                                            "vit": vit, **model}, "moe": moe})


def _images(B=3, C=1, size=16, seed=0):
    return torch.randn(B, C, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes_and_pooling(pool):
    cfg = vit_config(vit={"pool": pool})
    torch.manual_seed(0)
    model = ViT(cfg.model, cfg.moe)
    out = model(_images())
    assert out.tokens_BSD.shape == (3, 1 + 16, 32) and out.features_BD.shape == (3, 32) and out.routings == []
    if pool == "cls":
        assert torch.equal(out.features_BD, out.tokens_BSD[:, 0])
    else:  # the final norm of the patch tokens' mean: not the mean of the normed tokens, not the class token
        assert not torch.allclose(out.features_BD, out.tokens_BSD[:, 1:].mean(1), atol=1e-4)
        assert torch.allclose(out.features_BD.mean(-1), torch.zeros(3), atol=1e-5)  # LayerNorm output


def test_attention_is_not_causal():
    """The class token (position 0) sees the last patch: a causal mask would hide it."""
    cfg = vit_config()
    torch.manual_seed(0)
    model = ViT(cfg.model, cfg.moe)
    x = _images()
    y = x.clone()
    y[:, :, -4:, -4:] += 1.0  # only the last patch changes
    assert (model(x).features_BD - model(y).features_BD).abs().max() > 1e-3


def test_moe_in_every_other_block_of_the_last_layers():
    """V-MoE 'last 2' on 4 blocks: MoE in blocks 1 and 3 (moe.first_moe_layer 1, every 2), GELU experts;
    task routing reads the domain ids."""
    moe = {"num_experts": 4, "top_k": 1, "every": 2, "first_moe_layer": 1, "activation": "gelu",
           "router": {"type": "task"}}
    cfg = vit_config(moe=moe)
    torch.manual_seed(0)
    model = ViT(cfg.model, cfg.moe, num_domains=3)
    assert [type(b.mlp) for b in model.blocks] == [MLP, MoELayer, MLP, MoELayer]
    assert model.moe_layers() == [model.blocks[1].mlp, model.blocks[3].mlp]
    out = model(_images(), torch.tensor([0, 2, 2]))
    assert len(out.routings) == 2
    ids_BS = out.routings[0].expert_ids_TK[:, 0].view(3, 17)
    assert (ids_BS == ids_BS[:, :1]).all() and ids_BS[1, 0] == ids_BS[2, 0]  # one expert per domain
    out.features_BD.sum().backward()
    assert model.blocks[1].mlp.experts.w_up_EDF.grad is not None


def test_wrong_image_size_is_one_line():
    cfg = vit_config()
    model = ViT(cfg.model, cfg.moe)
    with pytest.raises(ValueError, match=r"images are 1x32x32 \(C x H x W\), the ViT expects 1x16x16"):
        model(_images(size=32))
    with pytest.raises(ValueError, match=r"images are 3x16x16 .* expects 1x16x16"):
        model(_images(C=3))


def test_config_errors_name_the_key_and_lm_default_is_unchanged():
    with pytest.raises(ConfigError, match=r"^model.vit.image_size: 30 is not divisible by model.vit.patch_size=4$"):
        load_config(None, ["model.arch=vit", "model.vit.image_size=30", "moe.enabled=false"])
    with pytest.raises(ConfigError, match=r"^model.vit.pretrained: no file or directory at 'nowhere.pth'$"):
        load_config(None, ["model.arch=vit", "model.vit.pretrained=nowhere.pth"])
    with pytest.raises(ValueError, match="not divisible"):
        ViT(vit_config(vit={"image_size": 18}).model, Config().moe)
    assert Config().model.arch == "lm"
    assert load_config(None, ["model.arch=vit", "model.d_model=36", "model.n_heads=4"]).model.n_heads == 4  # 9 per head
