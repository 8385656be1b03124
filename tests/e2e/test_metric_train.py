"""End to end: a tiny ViT metric run on two embedded glyph domains resumes with identical losses and
evaluation, logs retrieval metrics, plots its neighbours, and `moe-sys embed` reads its checkpoint."""
import json

import numpy as np
import yaml
from safetensors import safe_open

from tests.e2e.conftest import read_metrics, run_cli

TINY_METRIC = {
    "model": {"arch": "vit", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
              "vit": {"image_size": 32, "patch_size": 8, "in_channels": 1}},
    "moe": {"enabled": False},
    "task": {"type": "metric", "metric": {"loss": {"name": "curricularface"}, "projector": {"dim": 16},
                                          "sampler": {"m_per_class": 2, "domains": "balanced"}}},
    "data": {"domains": [{"name": "latin"}, {"name": "arrows"}]},
    "train": {"steps": 6, "micro_batch_size": 8, "lr": 1.0e-3, "warmup_steps": 2, "eval_every": 3},
    "parallel": {"procs": 2, "ep_size": 1},
    "checkpoint": {"every": 0},
    "logging": {"log_every": 1},
}


def test_metric_run_resumes_exactly_and_embeds(tmp_path, quick_sets):
    config = tmp_path / "metric.yaml"
    config.write_text(yaml.safe_dump(TINY_METRIC))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    proc = run_cli("train", str(config), *quick_sets, "--set", f"logging.run_dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_cli("train", str(config), *quick_sets, "--set", f"logging.run_dir={stopped}",
                   "--set", "train.stop_after=4").returncode == 0
    proc = run_cli("train", str(config), *quick_sets, "--set", f"logging.run_dir={stopped}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["metric_loss"] == rb["metric_loss"] and ra["loss"] == rb["loss"], ra["step"]
    assert a[2]["retrieval"] == b[2]["retrieval"] and a[5]["retrieval"] == b[5]["retrieval"]
    assert {"unified/R@1", "hmean/MAP@R", "domain/latin/R@1", "domain/arrows/RP"} <= a[5]["retrieval"].keys()
    assert a[5]["unified_R@1"] == a[5]["retrieval"]["unified/R@1"] and "images_per_s" in a[5]

    proc = run_cli("plot", str(straight))
    assert proc.returncode == 0 and "neighbours.png" in proc.stdout, proc.stderr[-2000:]

    images = tmp_path / "images"
    images.mkdir()
    glyph = np.load(next((tmp_path.parent / "moe_sys_cache" / "glyphs").glob("v*/images.npy")))[0]
    import matplotlib.image
    for name in ("a.png", "b.png"):
        matplotlib.image.imsave(images / name, glyph, cmap="gray", vmin=0, vmax=255)
    out = tmp_path / "emb.safetensors"
    proc = run_cli("embed", str(straight), str(images), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        emb = f.get_tensor("embeddings")
        assert json.loads(f.metadata()["paths"]) == ["a.png", "b.png"]
    assert emb.shape == (2, 16) and emb[0].norm().item() > 0.99 and (emb[0] - emb[1]).abs().max() == 0


def test_bad_image_input_is_one_line_before_any_rank_starts(tmp_path, quick_sets):
    (tmp_path / "mine" / "only").mkdir(parents=True)
    cfg = {**TINY_METRIC, "data": {"domains": [{"name": "mine", "path": str(tmp_path / "mine")}]}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(config), *quick_sets, "--set", f"logging.run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'mine'}: 1 class folder(s); the "
                                                    "class-disjoint split needs at least 2")
    assert "Traceback" not in proc.stderr
