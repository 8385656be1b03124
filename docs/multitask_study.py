"""The measured Delta_m study of docs/multitask.md: multitask learning on the glyph scenes (S, D, N, E, G),
every row from the same pre-trained backbone, the same steps and batch per run, two seeds.

    nice -n 5 python docs/multitask_study.py [--out runs/multitask_study] [--steps 300] [--seeds 1,2]
        [--backbone runs/vit_pretrain] [--affinity runs/affinity_seed{seed}] [--draws 1] [--report]

Rows (each once per seed; train.seed = data.seed = the seed):
  single-task        configs/multitask_shared.yaml with one task, one run per task: the Delta_m reference
  shared             configs/multitask_shared.yaml (one fine-tuned encoder pass read by every decoder)
  vtagml             configs/multitask_vtagml.yaml (frozen ViT + TAA, TSN, conditional bottlenecks)
  affinity groups    the K = 2 groups `moe-sys tasks group` picks from the seed's affinity run
                     (docs/affinity_study.sh), each trained as configs/multitask_vtagml.yaml with its members
  random groups      groupings of the same shape (group sizes, and how many tasks each group serves), members
                     drawn by random.Random(1000 * seed + draw), each trained and scored like the affinity groups
  task experts       configs/multitask_task_experts.yaml (adapter experts routed by the task id, MI loss)
A grouping's task is scored by the run of the group that serves it; Delta_m (moe_sys.eval.dense) is computed
here for every row from the runs' last evaluations against the same seed's single-task runs. A group run is
keyed by its members, so a random group equal to an affinity group reuses that run. The affinity probe is off
in every run (task.multitask.affinity.every=0: it leaves training bit-identical, tests/distributed/
test_affinity_probe.py, and costs time). Seeds run one after the other, all rows of a seed before the next,
so a seed that is in the table is complete. Runs that finished are reused (delete OUT/<run> to redo one);
--report trains nothing and renders the table (also OUT/results.md) from the finished runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moe_sys.analysis.affinity import select_groups  # noqa: E402
from moe_sys.analysis.affinity_plot import latest_affinity  # noqa: E402
from moe_sys.analysis.plot import read_records  # noqa: E402
from moe_sys.analysis.task_groups import group_run  # noqa: E402
from moe_sys.eval.dense import LOWER_IS_BETTER, PRIMARY, delta_m  # noqa: E402
from moe_sys.tasks.multitask import last_evaluation  # noqa: E402

import study_runs  # noqa: E402  (docs/, beside this script)
from study_runs import finished, wall_s  # noqa: E402

TASKS = ["S", "D", "N", "E", "G"]
SHARED, VTAGML, EXPERTS = "configs/multitask_shared.yaml", "configs/multitask_vtagml.yaml", \
    "configs/multitask_task_experts.yaml"
COMMON = ["checkpoint.every=0", "logging.progress_bar=false", "logging.tensorboard=false",
          "task.multitask.affinity.every=0"]
COLUMNS = ["S/miou", "D/rmse", "D/abs_rel", "N/mean_angle", "E/l1", "G/acc"]
DELTAS = {"delta_m": TASKS, "delta_m S-D-N-E": TASKS[:4]}  # all tasks; VTAGML's dense protocol, without G


def train(config: str, run_dir: str, sets: list) -> None:
    study_runs.train(config, run_dir, COMMON + sets)


def affinity_grouping(affinity_run: str, out_dir: str, k: int):
    """`moe-sys tasks group AFFINITY_RUN --groups K --out OUT_DIR` (its lines printed, its configs written) and
    the grouping as (members, served) task-name tuples per group."""
    for line in group_run(affinity_run, k, out_dir):
        print(line)
    entry = latest_affinity(read_records(affinity_run))
    if entry["tasks"] != TASKS:
        sys.exit(f"{affinity_run}: affinity over {entry['tasks']}, the study's tasks are {TASKS}")
    grouping = select_groups(entry["lookahead_mean"], k)
    return [(tuple(TASKS[t] for t in members), tuple(t for i, t in enumerate(TASKS) if grouping.assignment[i] == g))
            for g, members in enumerate(grouping.groups)]


def random_grouping(shape: list, seed: int, draw: int) -> list:
    """A grouping of the same shape as ``shape`` (the served counts and sizes of its groups): the tasks shuffled
    and split into the served sets, each group filled up with members drawn from the tasks it does not serve.
    Draws equal to ``shape`` itself are redrawn (the same generator continues)."""
    rng = random.Random(1000 * seed + draw)
    while True:
        order, groups, start = rng.sample(TASKS, len(TASKS)), [], 0
        for members, served in shape:
            own = order[start:start + len(served)]
            start += len(served)
            extra = rng.sample([t for t in TASKS if t not in own], len(members) - len(own))
            groups.append((tuple(sorted(own + extra, key=TASKS.index)), tuple(sorted(own, key=TASKS.index))))
        if sorted(groups) != sorted(shape):
            return groups


def group_dir(out: str, members: tuple, seed: int) -> str:
    return os.path.join(out, f"group-{''.join(members)}-seed{seed}")


def grouping_metrics(out: str, grouping: list, seed: int, sets: list, report: bool):
    """Each group trained as the VTAGML config with its members; each task's metrics from the group serving
    it. None in report mode unless every group finished."""
    runs = [group_dir(out, members, seed) for members, _ in grouping]
    if report and not all(finished(r) for r in runs):
        return None
    metrics = {}
    for (members, served), run in zip(grouping, runs):
        train(VTAGML, run, sets + ["task.multitask.tasks=" + json.dumps(list(members))])
        found = last_evaluation(run)
        metrics.update({k: v for k, v in found.items() if k.split("/")[0] in served})
    return {**metrics, "wall_s": sum(wall_s(r) for r in set(runs)), "grouping": describe(grouping)}


def single_task(out: str, seed: int, sets: list, report: bool):
    runs = {t: os.path.join(out, f"single-{t}-seed{seed}") for t in TASKS}
    if report and not all(finished(r) for r in runs.values()):
        return None
    metrics = {}
    for t, run in runs.items():
        train(SHARED, run, sets + [f"task.multitask.tasks=[{t}]"])
        metrics.update({k: v for k, v in last_evaluation(run).items() if k.startswith(f"{t}/")})
    return {**metrics, "wall_s": sum(wall_s(r) for r in runs.values())}


def one_run(config: str, run: str, sets: list, report: bool):
    if not report:
        train(config, run, sets)
    return {**last_evaluation(run), "wall_s": wall_s(run)} if finished(run) else None


def describe(grouping: list) -> str:
    return " + ".join("{" + ",".join(m) + "}" + ("" if m == s else f" (serves {','.join(s)})") for m, s in grouping)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/multitask_study")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (batch 2 x 16)")
    parser.add_argument("--seeds", default="1,2", help="train.seed = data.seed values, comma-separated")
    parser.add_argument("--backbone", default="runs/vit_pretrain", help="pre-trained run (configs/vit_pretrain.yaml)")
    parser.add_argument("--affinity", default="runs/affinity_seed{seed}",
                        help="the seed's affinity run (docs/affinity_study.sh); {seed} is replaced")
    parser.add_argument("--groups", type=int, default=2, help="K of `moe-sys tasks group`")
    parser.add_argument("--draws", type=int, default=1, help="random groupings per seed")
    parser.add_argument("--report", action="store_true", help="train nothing: the table of the finished runs")
    args = parser.parse_args()
    out, backbone = os.path.abspath(args.out), os.path.abspath(args.backbone)
    if not os.path.exists(os.path.join(backbone, "config.yaml")):
        sys.exit(f"--backbone {backbone}: no run there (train configs/vit_pretrain.yaml first)")
    os.makedirs(out, exist_ok=True)
    results = {}  # row -> seed -> metrics
    for seed in map(int, args.seeds.split(",")):
        sets = [f"train.init_from={backbone}", f"train.steps={args.steps}", f"train.eval_every={args.steps}",
                f"train.seed={seed}", f"data.seed={seed}"]
        affinity_run = os.path.abspath(args.affinity.format(seed=seed))
        shape = affinity_grouping(affinity_run, os.path.join(out, f"groups-seed{seed}"), args.groups)
        rows = {
            "single-task models (one run per task)": lambda: single_task(out, seed, sets, args.report),
            "shared encoder + heads (`multitask_shared`)": lambda: one_run(
                SHARED, os.path.join(out, f"shared-seed{seed}"), sets, args.report),
            "frozen ViT + VTAGML adapters (`multitask_vtagml`)": lambda: one_run(
                VTAGML, os.path.join(out, f"vtagml-seed{seed}"), sets, args.report),
            "affinity-grouped VTAGML adapters (K = 2)": lambda: grouping_metrics(out, shape, seed, sets, args.report),
            **{f"random grouping {d + 1}, same shape": (lambda d=d: grouping_metrics(
                out, random_grouping(shape, seed, d), seed, sets, args.report)) for d in range(args.draws)},
            "task-routed adapter experts (`multitask_task_experts`)": lambda: one_run(
                EXPERTS, os.path.join(out, f"experts-seed{seed}"), sets, args.report),
        }
        for name, run in rows.items():
            result = run()
            if result is not None:
                results.setdefault(name, {})[seed] = result
            table = render(results, args)
            with open(os.path.join(out, "results.md"), "w") as f:
                f.write(table)
    print(table)


def render(results: dict, args) -> str:
    """Means over the seeds (Delta_m of each seed beside), then every seed's row."""
    reference = results.get("single-task models (one run per task)", {})
    for seeds in results.values():
        for seed, m in seeds.items():
            if seed in reference and all(PRIMARY[t] in m for t in TASKS):
                for key, tasks in DELTAS.items():
                    m[key] = delta_m(m, reference[seed], [PRIMARY[t] for t in tasks])
    head = "| row | " + " | ".join(COLUMNS + list(DELTAS)) + " | wall (min) |"
    rule = "|" + "---|" * (len(COLUMNS) + len(DELTAS) + 2)
    mean_lines, seed_lines = [head, rule], [head, rule]
    for name, seeds in results.items():
        runs = list(seeds.values())
        cells = [f"{statistics.mean(r[k] for r in runs):.4g}" for k in COLUMNS]
        for key in DELTAS:
            dm = [r[key] for r in runs if key in r]
            per_seed = " / ".join(f"{d:+.2f}" for d in dm)
            cells.append(f"**{statistics.mean(dm):+.2f}** ({per_seed})" if dm else "-")
        cells.append(f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f}")
        seeds_note = ", ".join(f"seed {s}" for s in seeds)
        mean_lines.append(f"| {name} [{seeds_note}] | " + " | ".join(cells) + " |")
        for seed, r in seeds.items():
            label = f"{name}, seed {seed}" + (f": {r['grouping']}" if "grouping" in r else "")
            row = ([f"{r[k]:.4g}" for k in COLUMNS] + [f"{r[key]:+.2f}" if key in r else "-" for key in DELTAS]
                   + [f"{r['wall_s'] / 60:.1f}"])
            seed_lines.append(f"| {label} | " + " | ".join(row) + " |")
    lower = ", ".join(k for k in COLUMNS if LOWER_IS_BETTER[k])
    return ("Mean over seeds (Delta_m: mean, then each seed):\n\n" + "\n".join(mean_lines) + "\n\nEach seed:\n\n"
            + "\n".join(seed_lines) + f"\n\n({args.steps} steps x 32 scenes (16 per rank, 2 ranks) per run; lower is "
            f"better for {lower}; Delta_m in % against the same seed's single-task runs, over all five tasks and over the dense four; wall: minutes of the row's "
            "runs, summed)\n")


if __name__ == "__main__":
    main()
