"""Pre-trained ViT weights: random timm and transformers ViTs of two shapes, saved to disk, loaded into our
ViT, must give the same features (fp32, max abs diff <= 1e-5); bad files get one line naming the key."""
import os

import pytest
import torch

from moe_sys.config import ConfigError, load_config
from moe_sys.config.schema import Config
from moe_sys.models.vit import build_vit
from tests import torchvision_stub

SHAPES = [dict(image=32, patch=4, layers=2, dim=64, heads=4, ff=128, chans=1, qkv_bias=True, pool="cls"),
          dict(image=32, patch=8, layers=3, dim=96, heads=3, ff=160, chans=3, qkv_bias=False, pool="mean")]


def _config(s, eps, path):
    return Config.model_validate({
        "model": {"arch": "vit", "d_model": s["dim"], "n_layers": s["layers"], "n_heads": s["heads"], "d_ff": s["ff"],
                  "norm_eps": eps, "vit": {"image_size": s["image"], "patch_size": s["patch"],
                                           "in_channels": s["chans"], "qkv_bias": s["qkv_bias"], "pool": s["pool"],
                                           "pretrained": path}},
        "moe": {"enabled": False}})


def _randomize(model, seed):
    """Every parameter random (timm/HF init zero biases, unit norms, a near-zero class token: a mapping
    that swapped or dropped them would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _images(s, seed=0):
    return torch.randn(3, s["chans"], s["image"], s["image"], generator=torch.Generator().manual_seed(seed))


def _timm_vit(s):
    VisionTransformer = torchvision_stub.vision_transformer_class()
    return _randomize(VisionTransformer(img_size=s["image"], patch_size=s["patch"], in_chans=s["chans"],
                                        embed_dim=s["dim"], depth=s["layers"], num_heads=s["heads"],
                                        mlp_ratio=s["ff"] / s["dim"], qkv_bias=s["qkv_bias"], num_classes=0,
                                        global_pool="token" if s["pool"] == "cls" else "avg"), 1)


def _hf_vit(s):
    from transformers.models.vit.configuration_vit import ViTConfig
    from transformers.models.vit.modeling_vit import ViTModel

    config = ViTConfig(hidden_size=s["dim"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       intermediate_size=s["ff"], image_size=s["image"], patch_size=s["patch"],
                       num_channels=s["chans"], qkv_bias=s["qkv_bias"])
    return _randomize(ViTModel(config), 2)  # with its pooler, which the loader must leave out


@pytest.mark.parametrize("shape", SHAPES, ids=["p4-d64-grey-cls-safetensors", "p8-d96-rgb-avg-pth"])
def test_timm_vit_loads_with_equal_features(shape, tmp_path):
    from safetensors.torch import save_file

    timm_vit = _timm_vit(shape)
    path = str(tmp_path / ("vit.safetensors" if shape["pool"] == "cls" else "vit.pth"))
    state = {k: v.contiguous() for k, v in timm_vit.state_dict().items()}
    save_file(state, path) if path.endswith(".safetensors") else torch.save(state, path)
    ours = build_vit(_config(shape, 1e-6, path)).eval()
    x = _images(shape)
    with torch.no_grad():
        out, tokens = ours(x), timm_vit.forward_features(x)
        expected = timm_vit.forward_head(tokens, pre_logits=True)
    assert (out.features_BD - expected).abs().max() <= 1e-5
    if shape["pool"] == "cls":  # timm's avg-pool ViT returns its tokens before the (post-pool) norm
        assert (out.tokens_BSD - tokens).abs().max() <= 1e-5
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("shape", SHAPES, ids=["p4-d64-grey-qkvbias", "p8-d96-rgb-noqkvbias"])
def test_hf_vit_loads_with_equal_features(shape, tmp_path):
    hf_vit = _hf_vit(shape)
    hf_vit.save_pretrained(str(tmp_path))
    shape = {**shape, "pool": "cls"}  # ViTModel's last_hidden_state[:, 0]
    ours = build_vit(_config(shape, 1e-12, str(tmp_path))).eval()
    x = _images(shape)
    with torch.no_grad():
        out, hidden = ours(x), hf_vit(pixel_values=x).last_hidden_state
    assert (out.tokens_BSD - hidden).abs().max() <= 1e-5
    assert (out.features_BD - hidden[:, 0]).abs().max() <= 1e-5


def test_hf_config_mismatch_is_one_line_naming_the_key(tmp_path):
    shape = SHAPES[0]
    _hf_vit(shape).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"config.json: gives model.norm_eps = 1e-12, but the config has 1e-06"):
        build_vit(_config(shape, 1e-6, str(tmp_path)))
    overrides = [f"model.{k}={v}" for k, v in {"arch": "vit", "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                                               "norm_eps": 1e-12, "vit.patch_size": 8, "moe.enabled": False}.items()]
    overrides = [o.replace("model.moe.", "moe.") for o in overrides] + [f"model.vit.pretrained={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^\S+config.json: gives model.vit.patch_size = 4, but the config has 8$"):
        load_config(None, overrides)  # caught when the config is read: the CLI's one line, exit code 2
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        build_vit(_config(shape, 1e-12, str(tmp_path)))


def test_bad_timm_files_are_one_line_naming_the_key(tmp_path):
    from safetensors.torch import save_file

    shape = SHAPES[0]
    state = {k: v.contiguous() for k, v in _timm_vit(shape).state_dict().items()}
    path = str(tmp_path / "vit.safetensors")
    save_file({**state, "blocks.0.ls1.gamma": torch.ones(shape["dim"])}, path)
    with pytest.raises(ValueError, match=r"timm key 'blocks.0.ls1.gamma' has no counterpart"):
        build_vit(_config(shape, 1e-6, path))
    save_file(state, path)
    with pytest.raises(ValueError, match=r"embed.pos_embed has shape \(1, 65, 64\), the ViT of this config expects "
                                         r"\(1, 17, 64\)"):
        build_vit(_config({**shape, "image": 16}, 1e-6, path))
    save_file({("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}, path)
    with pytest.raises(ValueError, match="trained with average pooling"):
        build_vit(_config(shape, 1e-6, path))
