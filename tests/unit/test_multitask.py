"""The multitask task: dense metrics and Delta_m against hand-computed cases, the uncertainty weighting
formula, mixed-batch masking against a per-task computation, the protocols' options (font groups, test
domains, evaluation-only tasks from train.init_from), and the one-line config errors."""
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


def config(tmp_path, sections=None, **multitask):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["task"]["multitask"].update(multitask)
    raw.update(sections or {})
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
    ({"fonts": {"train": "C"}}, "task.multitask.fonts.train"),
    ({"eval_tasks": ["D", "depth"]}, "task.multitask.eval_tasks: 'depth' is not a target of the scene data"),
    ({"tasks": ["S"], "eval_tasks": ["S", "D"], "losses": {}}, "task.multitask.eval_tasks: D not trained (not in task.multitask.tasks), "
                                                 "so their decoders must come from train.init_from, which is not set"),
    ({"test_domains": ["georgian"]}, "task.multitask.eval_tasks: S, G cannot be evaluated on task.multitask.test_domains"),
    ({"test_domains": ["klingon"], "eval_tasks": ["D"]}, "task.multitask.test_domains: no embedded glyph domain named "
                                                         "'klingon'"),
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


LATIN = set(range(0x41, 0x5B)) | set(range(0x61, 0x7B))


def test_font_groups_and_test_domains_pick_the_scenes(tmp_path):
    """fonts B/B: the training scenes hold the same (training) classes as with fonts A, in other
    renderings; test_domains: the test scenes hold only that block's glyphs, S has one domain."""
    held_out = MultitaskTask(config(tmp_path, fonts={"train": "B", "test": "B"}, test_domains=["arrows"],
                                    eval_tasks=["D", "N", "E"]))
    default = MultitaskTask(config(tmp_path))
    train, test = held_out.train_set, held_out.test_set
    assert not np.array_equal(train.images_NHW, default.train_set.images_NHW)
    latin_train = set(default.train_set.largest_class_N[default.train_set.largest_domain_N == 0].tolist())
    assert set(train.largest_class_N[train.largest_domain_N == 0].tolist()) <= LATIN
    assert latin_train <= LATIN and not latin_train & set(default.test_set.largest_class_N.tolist())
    assert all(0x2190 <= c <= 0x21FF for c in test.largest_class_N) and set(np.unique(test.seg_NHW)) == {0, 1}
    assert held_out.eval_tasks == ["D", "N", "E"] and held_out.all_tasks == ["S", "D", "N", "E", "G"]


def test_glyph_font_groups_render_each_split_in_its_group():
    from moe_sys.data import glyphs

    group = {path.name: glyphs.font_group(path) for path in glyphs.font_paths()}
    default, held_out = glyphs.build(["latin"], 0)[1], glyphs.build(["latin"], 0, ("B", "B"))[1]
    assert {(e["split"], group[e["font"]]) for e in default} == {("train", "A"), ("test", "B")}
    assert {group[e["font"]] for e in held_out} == {"B"}
    for split in ("train", "test"):  # the same classes, each with its images
        assert sorted(e["class"] for e in held_out if e["split"] == split) == \
            sorted(e["class"] for e in default if e["split"] == split)


def test_evaluation_only_tasks_come_from_init_from_frozen_and_evaluated(tmp_path):
    """Zero-shot task transfer: a run trained on S, D, N (adapters) is loaded into a run that trains S
    only; D and N get their decoders and task ids from it, no gradient, no change from training, and
    are evaluated (equal to a direct computation with their task id)."""
    from safetensors.torch import save_file

    from moe_sys.adapters.io import save_adapters
    from moe_sys.train.optim import build_optimizer

    torch.manual_seed(0)
    source_cfg = config(tmp_path, tasks=["S", "D", "N"], mode="all")
    source_task = MultitaskTask(source_cfg)
    source = source_task.build_model()
    inject(source.encoder, source_cfg.adapters, source_task.domain_names())
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "source.safetensors"))
    save_adapters(source.encoder, str(tmp_path / "adapters"))
    sections = {"train": {"init_from": str(tmp_path / "source.safetensors"), "lr": 1e-2},
                "adapters": {**TINY["adapters"], "load_from": str(tmp_path / "adapters")}}
    cfg = config(tmp_path, sections, tasks=["S"], eval_tasks=["S", "D", "N"], mode="all", losses={},
                 fonts={"train": "B", "test": "B"})
    task = MultitaskTask(cfg)
    model = task.build_model()
    inject(model.encoder, cfg.adapters, task.domain_names())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert before.keys() == source.state_dict().keys()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in before.items())  # base, adapters, decoders
    optimizer, stream = build_optimizer(model, cfg.train), task.build_feeds(0, 1)[0]
    for _ in range(2):
        batch = next(stream)
        out = task.forward(model, batch)
        loss, parts = task.loss(out, batch)
        assert set(out.preds) == {"S"} and set(parts) == {"S"}
        loss.backward()
        assert all(p.grad is None and not p.requires_grad for t in "DN" for p in model.decoders[t].parameters())
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("decoders.D.", "decoders.N.")))
    assert not torch.equal(after["decoders.S.head.weight"], before["decoders.S.head.weight"])
    model.device = torch.device("cpu")  # as the engine has
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        record = task.evaluate(model, None)
    finally:
        torch.distributed.destroy_process_group()
    assert {"S/miou", "D/rmse", "N/mean_angle"} <= record.keys() and "E/l1" not in record
    test = scene_batch(task.test_set, np.arange(4), ["D"], np.zeros(4, np.int64))
    with torch.no_grad():
        depth = model(test["images"], test["domain_ids"], per_task=True, tasks=["D"]).preds["D"][:, 0]
    assert record["D/rmse"] == pytest.approx(float(((depth - test["height"]) ** 2).mean().sqrt()), rel=1e-5)


def test_evaluation_only_task_without_a_saved_decoder_is_one_line(tmp_path):
    from safetensors.torch import save_file

    source_task = MultitaskTask(config(tmp_path, tasks=["S"], losses={}))
    source = source_task.build_model()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "s.safetensors"))
    task = MultitaskTask(config(tmp_path, {"train": {"init_from": str(tmp_path / "s.safetensors")}}, tasks=["S"],
                                eval_tasks=["S", "D"], losses={}))
    with pytest.raises(ValueError) as e:
        task.build_model()
    assert "train.init_from" in str(e.value) and "has no D decoder" in str(e.value) and "\n" not in str(e.value)
