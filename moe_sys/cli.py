"""`moe-sys` subcommands: parse arguments and hand over. No logic lives here."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from moe_sys.config import ConfigError, dump_config, load_config
from moe_sys.errors import UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set moe.top_k=1 (repeatable)")


def _resume_mode(value: str) -> str:
    from moe_sys.train.checkpoint import TAG_PATTERN

    if value in ("auto", "strict") or TAG_PATTERN.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: --resume takes strict or a checkpoint name (step_00000100), "
                                     "written --resume=VALUE; the config goes before it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-sys", description="Mixture-of-Experts training on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (starts the deepspeed launcher if no launcher started us)")
    _config_args(p)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", nargs="?", const="auto", type=_resume_mode, metavar="strict|step_N",
                     help="continue from the newest intact checkpoint (warns when it passes over a damaged one); "
                          "--resume=strict refuses any damage; --resume=step_N takes that checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in a used run directory: the old one is moved aside to RUN_DIR.old-DATE")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    p = sub.add_parser("config", help="print the resolved config")
    _config_args(p)
    p = sub.add_parser("prepare-data", help="turn .txt/.jsonl files into an indexed dataset for data.domains")
    p.add_argument("inputs", nargs="+", help=".txt files (one document each) or .jsonl files (one per line)")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl lines")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="a tokenizer.json or a Hugging Face model dir (default: bytes)")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE of this vocabulary size on the inputs (offline)")
    sub.add_parser("doctor", help="show the environment: torch, DeepSpeed, kernels, launch variables")
    p = sub.add_parser("plot", help="draw PNGs of a run's expert load, domain x expert usage and losses")
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    tasks = sub.add_parser("tasks", help="multitask runs: group tasks by the affinity a run measured")
    p = tasks.add_subparsers(dest="tasks_command", required=True).add_parser(
        "group", help="TAG's task grouping on a run's mean lookahead affinity; writes one config per group")
    p.add_argument("run_dir", help="a multitask run directory (config.yaml + metrics.jsonl with affinity records)")
    p.add_argument("--groups", type=int, required=True, metavar="K", help="at most K groups (1 <= K <= tasks)")
    p.add_argument("--out", help="where the group configs go (default: RUN_DIR/groups)")
    p = sub.add_parser("sweep", help="run a grid of configs, then write results.csv, results.md and plots")
    p.add_argument("spec", help="sweep file, e.g. configs/sweeps/tiny_grid.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="submit the unfinished points as a SLURM job array")
    mode.add_argument("--report-only", action="store_true", help="only write the results of the runs so far")
    p = sub.add_parser("embed", help="write embeddings of a folder of images by a trained metric run (safetensors)")
    p.add_argument("run_dir", help="a metric run directory (config.yaml + checkpoints)")
    p.add_argument("images", help="folder searched recursively for .png/.jpg images of the run's image size")
    p.add_argument("--out", required=True, help="output .safetensors: embeddings [N, D] and the paths in its metadata")
    _plan_args(sub.add_parser("plan", help="per-rank memory, all-to-all cost and fit of a config on N GPUs"))
    _merge_args(sub.add_parser("merge", help="merge models or adapters (average, task arithmetic, TIES, DARE), "
                                             "or upcycle a dense model into an MoE one"))
    p = sub.add_parser("convert", help="Hugging Face <-> moe_sys: from-hf HF_DIR (config.json + safetensors), "
                                       "to-hf RUN_DIR (a run or a from-hf output)")
    p.add_argument("direction", choices=["from-hf", "to-hf", "lora-to-peft", "lora-from-peft"])
    p.add_argument("source", help="from-hf: a Hugging Face model dir; to-hf: a run dir with config.yaml; "
                                  "lora-to-peft: an adapter dir; lora-from-peft: a PEFT adapter dir")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--base", help="lora-*: the base model's dir (a from-hf output or run dir with config.yaml)")
    p = sub.add_parser("checkpoint", help="operate on a run's checkpoints")
    action = p.add_subparsers(dest="action", required=True)
    p = action.add_parser("reshard", help="rewrite the checkpoint --resume would take for another expert-parallel "
                                          "size, as a new tag step_N-epQ (the original stays)")
    p.add_argument("run_dir", help="a run directory (holds checkpoints/)")
    p.add_argument("--ep-size", type=int, required=True, help="the expert-parallel size to continue at")
    p.add_argument("--tag", default="auto", type=_resume_mode, help="which checkpoint: as --resume (default: newest intact)")
    p = sub.add_parser("generate", help="sample text from a run dir, a convert dir or a Hugging Face dir")
    p.add_argument("model", help="RUN_DIR (config.yaml + checkpoint or model.safetensors) or HF_DIR (config.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _plan_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (world size = gpus x nodes)")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GiB", help="memory of one GPU")
    p.add_argument("--link-gbps", type=float, default=25.0, metavar="GB/s",
                   help="all-to-all bandwidth per rank, sent + received (default 25 GB/s, ~ one 200 Gb/s NIC)")
    p.add_argument("--from-run", metavar="RUN_DIR", help="simulate the expert loads this run measured at larger EP")
    p.add_argument("--ep-sizes", default="8,64,256", help="EP sizes for --from-run (comma-separated)")


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", help="average | task_arithmetic | magnitude_prune | ties | dare_linear | dare_ties | upcycle")
    p.add_argument("inputs", nargs="*", help="models (run dirs, DeepSpeed checkpoints, .safetensors) or adapter dirs")
    p.add_argument("--out", required=True, help="output .safetensors (models) or directory (adapters)")
    p.add_argument("--base", help="theta_0 of the task vectors (models); the dense model to upcycle")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per input (default 1 each)")
    p.add_argument("--lam", type=float, default=1.0, help="lambda: scale of the merged task vector")
    p.add_argument("--density", type=float, default=0.2, help="share of each task vector TIES/DARE keep")
    p.add_argument("--seed", type=int, default=0, help="DARE drop masks; upcycling noise and routers")
    p.add_argument("--convention", default="peft", help="peft | mergekit: whose TIES/DARE formulas")
    p.add_argument("--majority-sign", default="total", help="total | frequency: TIES' sign election")
    p.add_argument("--rank", type=int, help="rank of merged LoRA adapters (default: sum of the inputs' ranks)")
    p.add_argument("--config", help="upcycle: config of the MoE model to build")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="upcycle: override a config value (repeatable)")
    p.add_argument("--noise-std", type=float, default=0.01, help="upcycle: expert noise, times each weight's std")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except UserError as e:  # a file or directory refused (damaged checkpoint, unsafe pickle, used run dir)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        if args.command not in FILE_COMMANDS:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _setup_logging() -> None:
    from moe_sys import quiet
    from moe_sys.parallel import launch_env

    rank = launch_env.detect().rank  # srun and mpirun set no RANK
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet.silence_known_noise()


def _train(args) -> int:
    from moe_sys.config.paths import resume_problem
    from moe_sys.parallel import launch_env

    launch = launch_env.detect()
    world = launch.world_size if launch.launcher != "none" else None
    cfg = load_config(args.config, args.overrides, world_size=world)
    if args.resume and resume_problem(cfg.logging.run_dir):
        raise ConfigError(resume_problem(cfg.logging.run_dir))
    from moe_sys.parallel.deepspeed_engine import dtype_problem

    if dtype_problem(cfg):  # before any rank starts
        raise ConfigError(dtype_problem(cfg))
    if launch.launcher == "none":
        from moe_sys.tasks import TASKS

        try:
            TASKS[cfg.task.type]().check_inputs(cfg)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from moe_sys.parallel.local_launch import run_local

        resume = _before_ranks_start(cfg, args)
        sets = [item for o in args.overrides for item in ("--set", o)]
        return run_local(cfg.parallel.procs, ["train", args.config, *sets, *([f"--resume={resume}"] if resume else [])])
    from moe_sys.train.trainer import train

    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def _before_ranks_start(cfg, args) -> Optional[str]:
    """The run-directory rules and the checkpoint to resume from, settled before any rank starts
    (the ranks then get that checkpoint's tag); returns the tag or None."""
    from moe_sys.train import checkpoint, run_dir

    aside = run_dir.prepare(cfg.logging.run_dir, bool(args.resume), args.overwrite)
    if aside:
        print(f"moved the previous run in {cfg.logging.run_dir} to {aside}", file=sys.stderr)
    if not args.resume:
        return None
    return checkpoint.choose(cfg.logging.run_dir, args.resume, warn=lambda line: print(f"warning: {line}", file=sys.stderr))


def _config(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _prepare_data(args) -> int:
    from moe_sys.data import PrepareDataError, prepare_data

    try:
        stats = prepare_data(args.inputs, args.output, text_key=args.text_key, tokenizer=args.tokenizer,
                             train_tokenizer=args.train_tokenizer)
    except PrepareDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens")
    return 0


def _doctor(args) -> int:
    import torch

    from moe_sys import ops
    from moe_sys.parallel import launch_env

    lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})"]
    for name in ("deepspeed", "megatron.core", "mpi4py"):
        try:
            module = __import__(name, fromlist=["__version__"])
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError as e:
            lines.append(f"{name}: not importable ({e})")
    lines.append(f"ops: {ops.describe()}")
    lines.append(f"launcher: {launch_env.detect()}")
    print("\n".join(lines))
    return 0


def _sweep(args) -> int:
    from moe_sys import sweep

    spec = sweep.load_sweep(args.spec)
    try:
        if args.report_only:
            return sweep.report(spec)
        return sweep.submit_slurm(spec) if args.slurm else sweep.run_local(spec)
    except RuntimeError as e:  # sbatch refused the jobs
        print(f"error: {e}", file=sys.stderr)
        return 2


def _merge(args) -> int:
    from moe_sys.adapters import merge

    cfg = load_config(args.config, args.overrides) if args.method == "upcycle" else None
    opts = merge.MergeOptions(args.method, args.weights, args.lam, args.density, args.seed, args.convention,
                              args.majority_sign)
    print(merge.run(args.method, args.inputs, args.out, opts, args.base, args.rank, cfg, args.noise_std))
    return 0


def _convert(args) -> int:
    from moe_sys.weights import hf_write

    if args.direction in ("from-hf", "to-hf"):
        convert = hf_write.from_hf if args.direction == "from-hf" else hf_write.to_hf
        print(convert(args.source, args.out))
    else:
        print(hf_write.convert_lora(args.direction, args.source, args.base, args.out))
    return 0


def _generate(args) -> int:
    from moe_sys.models import generate

    print(generate.run(args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed))
    return 0


def _plot(args) -> int:
    from moe_sys.analysis.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _checkpoint(args) -> int:
    from moe_sys.train.checkpoint import reshard_run

    print(reshard_run(args.run_dir, args.ep_size, args.tag))
    return 0


def _tasks(args) -> int:
    from moe_sys.analysis.task_groups import group_run

    print("\n".join(group_run(args.run_dir, args.groups, args.out)))
    return 0


def _plan(args) -> int:
    from moe_sys.plan.report import run

    world = args.gpus * args.nodes
    cfg = load_config(args.config, args.overrides, world_size=world)
    ep_sizes = [int(v) for v in args.ep_sizes.split(",")]
    print(run(cfg, args.gpus, args.nodes, args.gpu_memory, args.link_gbps, args.from_run, ep_sizes))
    return 0


def _embed(args) -> int:
    from moe_sys.tasks.embed import embed

    print(f"wrote {args.out}: {embed(args.run_dir, args.images, args.out)} embeddings")
    return 0


# Commands that read files the user names: their ValueError / OSError is a one-line refusal of that input.
FILE_COMMANDS = ("merge", "convert", "generate", "plot", "plan", "embed", "checkpoint", "tasks")
COMMANDS = {"train": _train, "config": _config, "prepare-data": _prepare_data, "doctor": _doctor, "plot": _plot,
            "sweep": _sweep, "merge": _merge, "convert": _convert, "generate": _generate, "plan": _plan,
            "embed": _embed, "checkpoint": _checkpoint, "tasks": _tasks}

if __name__ == "__main__":
    sys.exit(main())
