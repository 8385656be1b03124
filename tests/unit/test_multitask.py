"""The multitask task: dense metrics and Delta_m against hand-computed cases, the uncertainty weighting
formula, mixed-batch masking against a per-task computation, and the one-line config errors."""
import math

import numpy as np
import pytest
import torch
import yaml

from moe_sys.adapters.inject import inject
from moe_sys.config import load_config
from moe_sys.config.yaml_io import ConfigError
from moe_sys.eval.dense import DenseMeter, delta_m, miou
from moe_sys.tasks.multitask import MultitaskTask, scene_batch
from moe_sys.tasks.multitask_losses import uncertainty_weighted

TINY = {
    "model": {"arch": "vit", "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32,
              "vit": {"image_size": 32, "patch_size": 8, "in_channels": 1}},
    "moe": {"enabled": False},
    "adapters": {"modules": [
        {"type": "task_attention", "name": "taa", "targets": ["blocks.1.attn"], "max_tokens": 17},
        {"type": "task_norm", "name": "tsn", "targets": ["blocks.1.norm1"]},
        {"type": "conditional_bottleneck", "name": "cb", "targets": ["blocks.0", "blocks.1"]}]},
    "task": {"type": "multitask", "multitask": {"tasks": ["S", "D", "N", "E", "G"], "mode": "mixed",
                                                "domains": ["latin", "arrows"], "num_train": 12, "num_test": 4,
                                                "losses": {"D": "berhu"}}},
}


def config(tmp_path, **multitask):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["task"]["multitask"].update(multitask)
    raw["data"] = {"cache_dir": str(tmp_path.parent / "moe_sys_cache")}
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


def test_segmentation_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    meter = DenseMeter(seg_classes=4)  # class 3 appears nowhere: left out of the mean
    meter.add_S(torch.nn.functional.one_hot(pred, 4).permute(2, 0, 1)[None].float(), target[None])
    # class 0: tp 2, union 4; class 1: tp 2, union 3; class 2: tp 2, union 3
    assert meter.result()["S/miou"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert math.isnan(miou(torch.zeros(3, 3, dtype=torch.int64)))


def test_depth_normals_edges_accuracy_by_hand():
    meter = DenseMeter()
    target = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    pred = torch.tensor([[[[0.1, 0.5], [0.5, 0.5]]]])
    meter.add_D(pred, target)
    meter.add_E(pred, target)
    up = torch.tensor([0.0, 0.0, 1.0])
    normals_t = up.view(1, 3, 1, 1).expand(1, 3, 1, 2)
    normals_p = torch.stack([torch.tensor([0.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 0.0])], -1).view(1, 3, 1, 2)
    meter.add_N(normals_p, normals_t)
    meter.add_G(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    r = meter.result()
    assert r["D/rmse"] == pytest.approx(math.sqrt((0.01 + 0 + 0.25 + 0.0625) / 4))
    assert r["D/abs_rel"] == pytest.approx((0 + 0.5 / 1.0 + 0.25 / 0.25) / 3)  # the 0-height pixel is left out
    assert r["E/l1"] == pytest.approx((0.1 + 0 + 0.5 + 0.25) / 4)
    assert r["N/mean_angle"] == pytest.approx(45.0)  # 0 and 90 degrees
    assert r["G/acc"] == pytest.approx(2 / 3)


def test_delta_m_by_hand():
    metrics = {"S/miou": 0.6, "D/rmse": 0.08}
    baseline = {"S/miou": 0.5, "D/rmse": 0.1}
    assert delta_m(metrics, baseline, ["S/miou", "D/rmse"]) == pytest.approx((20.0 + 20.0) / 2)
    assert delta_m({"S/miou": 0.4, "D/rmse": 0.1}, baseline, ["S/miou", "D/rmse"]) == pytest.approx(-10.0)


def test_uncertainty_weighting_formula_and_its_optimum():
    losses = torch.rand(5, dtype=torch.float64) + 0.1
    log_var = torch.randn(5, dtype=torch.float64, requires_grad=True)
    terms = uncertainty_weighted(losses, log_var)
    sigma2 = log_var.exp()
    assert torch.allclose(terms, losses / (2 * sigma2) + torch.log(sigma2.sqrt()))  # Kendall et al. eq. (7)
    at_optimum = losses.log().requires_grad_()  # d/ds (exp(-s) L + s) / 2 = 0 at s = log L
    grad, = torch.autograd.grad(uncertainty_weighted(losses, at_optimum).sum(), at_optimum)
    assert torch.allclose(grad, torch.zeros(5, dtype=torch.float64))


def test_mixed_batch_masking_equals_per_task_computation(tmp_path):
    """One forward of a mixed batch (every sample conditioned on its own task) gives the same per-task
    losses and gradients as a separate forward of each task's samples with that task's id."""
    torch.manual_seed(0)
    cfg = config(tmp_path)
    task = MultitaskTask(cfg)
    model = task.build_model()
    inject(task.adapter_root(model), cfg.adapters, task.domain_names())
    with torch.no_grad():  # random FiLM and TAA matrices, so the task id changes the encoder's output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    task_ids = np.array([0, 1, 2, 3, 4, 0, 2, 2, 4, 1, 3, 0])
    batch = scene_batch(task.train_set, np.arange(12), task.tasks, task_ids)
    mixed = task.per_task_losses(task.forward(model, batch), batch)
    shared = task.shared_parameter_names(model)
    params = dict(model.named_parameters())
    for i, t in enumerate(task.tasks):
        rows = task_ids == i
        sub = scene_batch(task.train_set, np.arange(12)[rows], task.tasks, task_ids[rows])
        alone = task.per_task_losses(task.forward(model, sub), sub)[t]
        assert torch.allclose(mixed[t], alone, rtol=1e-5, atol=1e-7), t
        g_mixed = torch.autograd.grad(mixed[t], [params[n] for n in shared], retain_graph=True, allow_unused=True)
        g_alone = torch.autograd.grad(alone, [params[n] for n in shared], allow_unused=True)
        for a, b in zip(g_mixed, g_alone):
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-4, atol=1e-6), t
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert shared == [n for n in trainable if n.startswith("encoder.")] and "encoder.blocks.0.base_layer.attn.qkv.weight" \
        not in shared and any(n.startswith("decoders.") for n in trainable)


@pytest.mark.parametrize("change, needle", [
    ({"tasks": ["S", "depth"]}, "task.multitask.tasks: 'depth' is not a target of the scene data"),
    ({"weights": {"N": 2.0}, "tasks": ["S", "D"]}, "task.multitask.weights.N: not a task of task.multitask.tasks"),
    ({"losses": {"D": "l2"}}, "task.multitask.losses.D: unknown loss 'l2' for D; valid: l1, berhu"),
    ({"decoders": {"S": {"out": 5}}}, "task.multitask.decoders.S.out: 5 outputs, but the S target has 3"),
    ({"baseline": {"S/miou": 0.5}}, "task.multitask.baseline: no single-task value of D/rmse, N/mean_angle"),
])
def test_bad_multitask_config_is_one_line(tmp_path, change, needle):
    with pytest.raises((ConfigError, ValueError)) as e:
        MultitaskTask.check_inputs(config(tmp_path, **change))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_encoder_weights_of_another_image_size_get_resampled_positions(tmp_path):
    """init_from a 32 px encoder into the 48 px scenes' ViT: every other weight as saved, the class
    token's position kept, a constant position grid stays constant on the larger grid."""
    from safetensors.torch import save_file

    from moe_sys.models.vit import build_vit
    from moe_sys.tasks.metric import load_encoder_weights

    small, large = config(tmp_path), config(tmp_path)
    large.model.vit.image_size = 48
    source, target = build_vit(small), build_vit(large)
    with torch.no_grad():
        source.embed.pos_embed[:, 1:] = torch.randn(16)  # one value per feature, the same at every patch
    save_file({f"encoder.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    load_encoder_weights(target, str(tmp_path / "w.safetensors"))
    pos = target.embed.pos_embed
    assert pos.shape == (1, 37, 16) and torch.equal(pos[:, 0], source.embed.pos_embed[:, 0])
    assert torch.allclose(pos[:, 1:], source.embed.pos_embed[:, 1:2].expand(1, 36, 16), atol=1e-6)
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
