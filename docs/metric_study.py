"""The measured comparison in docs/metric.md: unified metric learning on the 8 embedded glyph domains,
every row from the same pre-trained backbone (except MoE from scratch), same budget per row.

    python docs/metric_study.py [--out runs/metric_study] [--steps 100] [--seeds 42,43] [--backbone runs/vit_pretrain]

1. The backbone is `moe-sys train configs/vit_pretrain.yaml` (trained here into BACKBONE if missing).
2. Every row is `moe-sys train configs/uml_puma.yaml` with --set overrides, --steps steps of the
   config's batch (64 images per rank x 2 ranks), once per seed (train.seed: adapter/head init, drop masks;
   the glyphs stay the same). "one model per domain" trains 8 models of steps/8 steps each (the same
   total budget) and evaluates their embeddings of the test split together (unified: pooled).
3. Prints a markdown table (also OUT/results.md): unified R@1, R@1 of cyrillic (dominant) and of the
   worst domain, harmonic mean of the per-domain R@1, unified MAP@R (means over seeds, +- half the
   range for unified R@1), trainable parameters, median training step time of the runs (2 ranks,
   measured under whatever else runs on the machine).
Runs that finished are reused (delete OUT/<row> to redo one).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import study_runs  # docs/, beside this script
from study_runs import finished

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ["cyrillic", "math_operators", "braille", "greek", "arrows", "georgian", "latin", "geometric_shapes"]
PUMA = {"name": "puma", "type": "puma", "targets": ["blocks.*.attn", "blocks.*.mlp"], "dim": 32, "scale": 0.1,
        "p_drop": 0.5}
EXPERT = {"kind": "bottleneck", "rank": 32, "activation": "relu", "scale": 0.1}
NO_ADAPTERS = "adapters.modules=[]"
ROWS = {
    "linear probe (frozen backbone, head only)": [NO_ADAPTERS, "task.metric.freeze_encoder=true"],
    "full fine-tune on the union": [NO_ADAPTERS],
    "one model per domain (8 full fine-tunes)": "per_domain",
    "PUMA stochastic adapters": [],  # configs/uml_puma.yaml as it is
    "adapters routed by domain (one PUMA slot per domain)": [
        "adapters.modules=" + json.dumps([{**PUMA, "slots": DOMAINS, "select": "domain"}])],
    "mixture of 4 adapter experts (token top-2, FFN)": [
        "adapters.modules=" + json.dumps([{"name": "moa", "type": "mixture", "targets": ["blocks.*.mlp"],
                                           "num_experts": 4, "top_k": 2, "expert": EXPERT}])],
    "SMEAR (4 adapter experts, FFN)": [
        "adapters.modules=" + json.dumps([{"name": "smear", "type": "smear", "targets": ["blocks.*.mlp"],
                                           "num_experts": 4, "segments": 1, "allow_noncausal": True,
                                           "expert": EXPERT}])],
    "MoE ViT from scratch (4 experts top-2, every other block)": [
        NO_ADAPTERS, "train.init_from=null", "moe.enabled=true", "moe.num_experts=4", "moe.top_k=2", "moe.every=2"],
}
PIXELS = "raw pixels (no model; reference)"
UNTRAINED, PRETRAINED = "untrained ViT, random head (no step)", "pre-trained ViT, random head (no step)"
COMMON = ["checkpoint.every=0", "logging.progress_bar=false", "logging.tensorboard=false"]


def train(config: str, run_dir: str, sets: list) -> None:
    study_runs.train(config, run_dir, COMMON + sets)


def records(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_time(runs: list) -> float:
    """Median step time (s) over the runs' logged steps after the first (which includes warm-up)."""
    return statistics.median(r["step_time_s"] for run in runs for r in records(run)[1:] if "step_time_s" in r)


def trainable_parameters(run_dir: str) -> int:
    """Trainable parameters of the run's model as the trainer builds it (encoder, adapters, head, proxies)."""
    from moe_sys.adapters.inject import inject
    from moe_sys.config import load_config
    from moe_sys.tasks import build_task

    cfg = load_config(os.path.join(run_dir, "config.yaml"), [], world_size=1)
    task = build_task(cfg)
    model = task.build_model()
    if cfg.adapters.modules:
        inject(task.adapter_root(model), cfg.adapters, task.domain_names())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize(run_dir: str) -> dict:
    last = [r for r in records(run_dir) if "retrieval" in r][-1]["retrieval"]
    return {**last, "trainable": trainable_parameters(run_dir), "step_s": step_time([run_dir])}


def per_domain(out: str, seed: str, sets: list, steps: int, report: bool = False):
    """8 full fine-tunes of steps/8 steps, one per domain; their test embeddings evaluated together
    (None in report mode unless all 8 finished)."""
    import numpy as np
    import torch

    from moe_sys.config import load_config
    from moe_sys.eval.retrieval import retrieval_metrics
    from moe_sys.tasks.embed import _Encoder
    from moe_sys.tasks.metric import embed_images, load_splits
    from moe_sys.weights import io as weights_io

    runs = [os.path.join(out, f"per_domain-{d}-seed{seed}") for d in DOMAINS]
    if report and not all(finished(r) for r in runs):
        return None
    for domain, run_dir in zip(DOMAINS, runs):
        train("configs/uml_puma.yaml", run_dir, sets + [NO_ADAPTERS, f"train.steps={max(1, steps // len(DOMAINS))}",
                                                        "data.domains=" + json.dumps([{"name": domain}])])
    union = load_config(os.path.join(REPO, "configs/uml_puma.yaml"), ["train.init_from=null"], world_size=1)
    _, test = load_splits(union)
    emb = torch.zeros(len(test.labels_N), union.task.metric.projector.dim)
    trainable = 0
    for d, run_dir in enumerate(runs):
        cfg = load_config(os.path.join(run_dir, "config.yaml"), [], world_size=1)
        model = _Encoder(cfg)
        state = weights_io.read_model_weights(run_dir)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("criterion.")}, strict=False)
        model.eval()
        rows = np.nonzero(test.domains_N == d)[0]
        with torch.no_grad():  # domain id 0: each model knows only its own domain
            emb[rows] = embed_images(model, _single_domain(test, rows),
                                     np.arange(len(rows)), 256)
        trainable += trainable_parameters(run_dir)
    metrics = retrieval_metrics(emb, torch.from_numpy(test.labels_N), torch.from_numpy(test.domains_N),
                                test.domain_names)
    return {**metrics, "trainable": trainable, "step_s": step_time(runs)}


def pixels() -> dict:
    """The reference row: raw test pixels as embeddings, through the same retrieval code."""
    import torch

    from moe_sys.config import load_config
    from moe_sys.eval.retrieval import retrieval_metrics
    from moe_sys.tasks.metric import load_splits, to_float

    _, test = load_splits(load_config(os.path.join(REPO, "configs/uml_puma.yaml"), ["train.init_from=null"],
                                      world_size=1))
    metrics = retrieval_metrics(to_float(torch.from_numpy(test.images_NCHW)).flatten(1),
                                torch.from_numpy(test.labels_N), torch.from_numpy(test.domains_N), test.domain_names)
    return {**metrics, "trainable": 0, "step_s": float("nan")}


def before_training(backbone: str) -> dict:
    """The model a row starts from, evaluated before any step: ViT (pre-trained or not), random head."""
    import numpy as np
    import torch

    from moe_sys.config import load_config
    from moe_sys.eval.retrieval import retrieval_metrics
    from moe_sys.tasks import build_task
    from moe_sys.tasks.metric import embed_images

    cfg = load_config(os.path.join(REPO, "configs/uml_puma.yaml"), [f"train.init_from={backbone}", NO_ADAPTERS],
                      world_size=1)
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    model = task.build_model().eval()
    model.device = torch.device("cpu")
    test = task.test_set
    with torch.no_grad():
        emb = embed_images(model, test, np.arange(len(test.labels_N)), 256)
    metrics = retrieval_metrics(emb, torch.from_numpy(test.labels_N), torch.from_numpy(test.domains_N), test.domain_names)
    return {**metrics, "trainable": 0, "step_s": float("nan")}


def _single_domain(images, rows):
    from moe_sys.data.images import ImageSet

    return ImageSet(images.images_NCHW[rows], images.labels_N[rows], images.domains_N[rows] * 0, images.domain_names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/metric_study")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per row (x the config's batch)")
    parser.add_argument("--seeds", default="42,43", help="train.seed values, comma-separated")
    parser.add_argument("--backbone", default="runs/vit_pretrain", help="pre-trained run (made if missing)")
    parser.add_argument("--report", action="store_true", help="train nothing: the table of the finished runs")
    args = parser.parse_args()
    out, backbone = os.path.abspath(args.out), os.path.abspath(args.backbone)
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(os.path.join(backbone, "config.yaml")):
        train("configs/vit_pretrain.yaml", backbone, [])
    rows = {PIXELS: [pixels()], UNTRAINED: [before_training("null")], PRETRAINED: [before_training(backbone)]}
    # row-major, one model per domain last: when time runs out, the single-model rows have both seeds
    order = sorted(enumerate(ROWS.items()), key=lambda item: item[1][1] == "per_domain")
    for i, (name, extra) in order:
        for seed in args.seeds.split(","):
            sets = [f"train.init_from={backbone}", f"train.steps={args.steps}", f"train.seed={seed}",
                    f"train.eval_every={args.steps}", f"train.warmup_steps={max(1, args.steps // 10)}"]
            result = (per_domain(out, seed, sets, args.steps, args.report) if extra == "per_domain" else
                      run_row(os.path.join(out, f"row{i}-seed{seed}"), sets + extra, args.report))
            if result is not None:
                rows.setdefault(name, []).append(result)
        table = render({name: rows[name] for name in [PIXELS, UNTRAINED, PRETRAINED, *ROWS] if name in rows}, args)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table)
    print(table)


def run_row(run_dir: str, sets: list, report: bool):
    """The row's summary (training it first unless ``report``); None for an unfinished run in report mode."""
    if not report:
        train("configs/uml_puma.yaml", run_dir, sets)
    return summarize(run_dir) if finished(run_dir) else None


def render(rows: dict, args) -> str:
    head = ("| row | unified R@1 | cyrillic R@1 | worst domain R@1 | hmean R@1 | unified MAP@R | trainable params "
            "| step (s) | seeds |")
    lines = [head, "|" + "---|" * 9]
    for name, runs in rows.items():
        mean = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
        r1 = [r["unified/R@1"] for r in runs]
        spread = f" ± {(max(r1) - min(r1)) / 2:.3f}" if len(runs) > 1 else ""
        worst = {d: mean(f"domain/{d}/R@1") for d in DOMAINS}
        low = min(worst, key=worst.get)
        cells = [f"{statistics.mean(r1):.3f}{spread}", f"{mean('domain/cyrillic/R@1'):.3f}",
                 f"{worst[low]:.3f} ({low})", f"{mean('hmean/R@1'):.3f}", f"{mean('unified/MAP@R'):.3f}",
                 f"{runs[0]['trainable']:,}", f"{statistics.median(r['step_s'] for r in runs):.2f}".replace("nan", "-"), str(len(runs))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n({args.steps} steps x 128 images (64 per rank, 2 ranks) per row and seed, seeds {args.seeds})\n"


if __name__ == "__main__":
    main()
