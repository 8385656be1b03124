"""Fuzzing the front door: broken configs, overrides, sweep files and merge/plot arguments.

Every case must end with exit code 2 and exactly one line on stderr that names the key or the file
at fault, with no traceback, before anything starts. Most cases call ``moe_sys.cli.main`` in this
process (with the launcher and the sweep's trainer replaced by tripwires); a few run ``moe-sys
train`` as real processes to show that no launcher is spawned.

A case is ``(id, make)``: ``make(ws)`` returns ``(argv, needle)`` for the workspace ``ws`` of
prepared files; the stderr line must contain ``needle``. Adding a command's cases is one more list.
"""
import json
import os
import subprocess
import sys

import pytest

from moe_sys import cli
from moe_sys.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _leaves(tree, prefix=""):
    """Every scalar key of the default config (the first item of lists of sections), with its value."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key == "deepspeed":  # free-form: merged over the generated DeepSpeed config, DeepSpeed checks it
            continue
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            yield from _leaves(value[0], f"{path}.0.")
        else:
            yield path, value


# A value of the wrong kind for a field whose default has this type.
WRONG_KIND = {bool: "7", int: "true", float: "fast", str: "[1, 2]", list: "oops", type(None): "{a: 1}"}
LEAVES = list(_leaves(Config().model_dump()))


def _set(item, needle):
    return lambda ws: (["--set", item], needle)


OVERRIDES = [(f"type-{key}", _set(f"{key}={WRONG_KIND[type(value)]}", f"{key}:")) for key, value in LEAVES]
OVERRIDES += [(f"bound-{item}", _set(item, key)) for item, key in [
    ("train.betas=[1.5, 0.9]", "train.betas.0:"), ("train.betas=[0.9, -0.1]", "train.betas.1:"),
    ("train.betas=[0.9]", "train.betas:"), ("data.seed=-1", "data.seed:"), ("train.seed=4294967296", "train.seed:"),
    ("train.lr=.inf", "train.lr:"), ("train.lr=1e999", "train.lr:"), ("train.lr=.nan", "train.lr:"),
    ("train.lr=0", "train.lr:"), ("train.lr=-1e-3", "train.lr:"),
    ("model.d_model=18446744073709551616", "model.d_model:"),
    ("model.vocab_size=4294967296", "model.vocab_size:"), ("moe.top_k=0", "moe.top_k:"),
    ("data.valid_fraction=1", "data.valid_fraction:"), ("model.norm_eps=1.5", "model.norm_eps:"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio:"), ("parallel.zero_stage=3", "parallel.zero_stage:"),
    ("moe.router.jitter_eps=1", "moe.router.jitter_eps:"), ("checkpoint.keep=-1", "checkpoint.keep:"),
    ("data.domains.0.weight=0", "data.domains.0.weight:"), ("data.domains.0.name=''", "data.domains.0.name:"),
    ("logging.run_dir=''", "logging.run_dir:"), ("moe.top_k=9", "moe.top_k:"), ("data.seq_len=4096", "data.seq_len:"),
    ("moe.router.num_groups=0", "moe.router.num_groups:"),
    ("adapters.modules=[{type: lora, name: a, rank: 0}]", "adapters.modules.0.rank:"),
    ("adapters.modules=[{type: lora, name: a, rank: true}]", "adapters.modules.0.rank:"),
    ("adapters.modules=[{type: smear, name: s, expert_dropout: 1.0}]", "adapters.modules.0.expert_dropout:"),
    ("adapters.modules=[{type: smear, name: s, targets: []}]", "adapters.modules.0.targets:"),
    ("data.domains=[]", "data.domains:"),
]]
OVERRIDES += [(f"unknown-{item}", _set(item, key)) for item, key in [
    ("bogus=1", "bogus: unknown key"), ("model.bogus=1", "model.bogus: unknown key"),
    ("moe.router.tpye=topk", "did you mean 'type'"), ("moe.balance.bias.bogus=1", "moe.balance.bias.bogus"),
    ("moe.balance.losses.0.bogus=1", "moe.balance.losses.0.bogus"), ("data.domains.0.bogus=1", "data.domains.0.bogus"),
    ("adapters.modules=[{type: lora, name: a, rnk: 2}]", "adapters.modules.0.rnk: unknown key; did you mean 'rank'"),
    ("adapters.modules=[{type: mixture, name: m, expert: {rnk: 2}}]", "adapters.modules.0.expert.rnk"),
    ("adapters.modules=[{type: lroa, name: a}]", "adapters.modules.0.type: unknown type 'lroa'; did you mean 'lora'"),
    ("adapters.modules=[{name: a}]", "adapters.modules.0.type: missing"),
]]
OVERRIDES += [(f"yaml-{value}", _set(f"moe.top_k={value}", "--set moe.top_k")) for value in [
    "[1,2", "{", "*a", "!!python/object/apply:os.system [echo owned]", "!!python/name:os.system", "{a: 1, a: 2}",
    '"unterminated', "@x", "`x", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]]
OVERRIDES += [(f"key-{item}", _set(item, needle)) for item, needle in [
    (".moe=1", "--set .moe"), ("moe..top_k=1", "--set moe..top_k"), ("moe.=1", "--set moe."),
    ("train.betas.0.x=1", "train.betas.0 is a value"), ("train.betas.9=1", "--set train.betas.9"),
    ("moe.top_k.x=1", "moe.top_k is a value"), ("=1", "expected KEY=VALUE"), ("moe.top_k", "expected KEY=VALUE"),
    ("data.domains.x.name=a", "--set data.domains.x.name"),
]]


def _file(name, data, needle=None, command=()):
    """Write ``data`` (TINY in text: the tiny config's path) to ws/name; argv is command + the path."""
    def make(ws):
        path = ws / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data.replace("TINY", TINY))
        return [*command, str(path)], needle or str(path)
    return make


FILES = [
    ("binary", _file("binary.yaml", bytes(range(256)))),
    ("latin1", _file("latin1.yaml", "data:\n  domains: [{name: caf\xe9}]\n".encode("latin-1"))),
    ("utf16", _file("utf16.yaml", "model:\n  d_model: 64\n".encode("utf-16"))),
    ("utf32", _file("utf32.yaml", "model:\n  d_model: 64\n".encode("utf-32"))),
    ("nul", _file("nul.yaml", b"model:\n  d_model: 64\x00\n")),
    ("syntax", _file("syntax.yaml", "train:\n  lr: [1, 2\n")),
    ("tab", _file("tab.yaml", "model:\n\td_model: 64\n")),
    ("bad-indent", _file("indent.yaml", "model:\n  d_model: 64\n   n_layers: 2\n")),
    ("dup-key", _file("dup.yaml", "model:\n  d_model: 64\n  d_model: 32\n")),
    ("dup-section", _file("dupsec.yaml", "moe:\n  top_k: 1\nmoe:\n  enabled: false\n")),
    ("dup-in-list", _file("duplist.yaml", "data:\n  domains:\n  - {name: a, name: b}\n")),
    ("empty", _file("empty.yaml", "")),
    ("comments", _file("comments.yaml", "# nothing here\n\n   # still nothing\n")),
    ("top-list", _file("list.yaml", "- model\n- moe\n")),
    ("top-scalar", _file("scalar.yaml", "just words\n")),
    ("python-tag", _file("tag.yaml", "model: !!python/object/apply:os.system [echo owned]\n")),
    ("unknown-nested", _file("unknown.yaml", "moe:\n  router:\n    bias: {rate: 1}\n", "moe.router.bias: unknown key")),
    ("dup-line", _file("dupline.yaml", "model:\n  d_model: 64\n  d_model: 32\n",
                       "dupline.yaml:3:3: not valid YAML: duplicate key 'd_model' (first on line 2)")),
    ("directory", lambda ws: ([str(ws)], str(ws))),
    ("missing", lambda ws: ([str(ws / "nope.yaml")], str(ws / "nope.yaml"))),
]


def _paths(ws):
    (ws / "text.txt").write_text("not weights\n")
    (ws / "emptydir").mkdir(exist_ok=True)
    (ws / "badmanifest").mkdir(exist_ok=True)
    spec = {"type": "lora", "name": "a", "rnk": 1}
    (ws / "badmanifest" / "manifest.json").write_text(json.dumps({"format": 1, "specs": [spec]}))
    (ws / "badmanifest" / "adapters.safetensors").write_bytes(b"")
    return ws


def _path_case(key, name, needle=None):
    return lambda ws: (["--set", f"{key}={_paths(ws) / name}"], needle or key)


PATHS = [(f"path-{key}-{name}", _path_case(key, name, needle)) for key, name, needle in [
    ("train.init_from", "nowhere", "does not exist"), ("train.init_from", "text.txt", "not a .safetensors"),
    ("train.init_from", "emptydir", "holds no DeepSpeed checkpoint"),
    ("adapters.load_from", "nowhere", "does not exist"),
    ("adapters.load_from", "text.txt", "not a directory"),
    ("adapters.load_from", "emptydir", "manifest.json"),
    ("adapters.load_from", "badmanifest", "specs.0.rnk"), ("data.domains.0.path", "nowhere", None),
    ("data.domains.0.path", "emptydir", None), ("logging.run_dir", "text.txt", "is a file"),
    ("data.cache_dir", "text.txt", "is a file"),
]]

CONFIG_CASES = OVERRIDES + FILES + PATHS


@pytest.fixture
def tripwires(monkeypatch):
    """Anything that would start ranks or training fails the test instead."""
    def started(*args, **kwargs):
        raise AssertionError("a launcher or a training run was started")
    from moe_sys.parallel import local_launch
    from moe_sys.sweep import run as sweep_run
    from moe_sys.train import trainer

    monkeypatch.setattr(local_launch, "run_local", started)
    monkeypatch.setattr(trainer, "train", started)
    monkeypatch.setattr(sweep_run, "_train", started)


def _one_line_error(argv, needle, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize("command", ["config", "train"])
@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_broken_configs_fail_with_one_line(case, command, tmp_path, capsys, tripwires):
    args, needle = case[1](tmp_path)
    config = [] if args[0] == "--set" else args[:1]
    overrides = args if args[0] == "--set" else args[1:]
    _one_line_error([command, *(config or [TINY]), *overrides], needle, capsys)


def _sweep(name, text):
    return _file(name, text, command=["sweep"])


SWEEP_CASES = [
    ("missing", lambda ws: (["sweep", str(ws / "nope.yaml")], str(ws / "nope.yaml"))),
    ("directory", lambda ws: (["sweep", str(ws)], str(ws))),
    ("binary", _sweep("bin.yaml", b"\xff\xfe\x00grid")),
    ("syntax", _sweep("syntax.yaml", "base: TINY\ngrid: {moe.top_k: [1, 2}\n")),
    ("dup-key", _sweep("dup.yaml", "base: TINY\ngrid: {moe.top_k: [1]}\ngrid: {moe.top_k: [2]}\n")),
    ("empty", _sweep("empty.yaml", "# nothing\n")),
    ("top-list", _sweep("list.yaml", "[base, grid]\n")),
    ("unknown-key", _sweep("gird.yaml", "base: TINY\ngrid: {moe.top_k: [1]}\ngird: 1\n")),
    ("grid-not-list", _sweep("scalar.yaml", "base: TINY\ngrid: {moe.top_k: 1}\n")),
    ("grid-empty", _sweep("emptygrid.yaml", "base: TINY\ngrid: {moe.top_k: []}\n")),
    ("grid-unknown-config-key", _sweep("badkey.yaml", "base: TINY\ngrid: {moe.bogus: [1, 2]}\n")),
    ("grid-bad-values", _sweep("badvalues.yaml", "base: TINY\ngrid: {moe.top_k: [true, 0]}\n")),
    ("set-bad-value", _sweep("badset.yaml", "base: TINY\nset: {train.lr: .inf}\ngrid: {moe.top_k: [1, 2]}\n")),
    ("base-missing", _sweep("nobase.yaml", "base: nowhere.yaml\ngrid: {moe.top_k: [1]}\n")),
    ("plot-metric", _sweep("plot.yaml", "base: TINY\ngrid: {moe.top_k: [1]}\nplots: [{x: moe.top_k, y: speed}]\n")),
    ("slurm-parallel", _sweep("slurm.yaml", "base: TINY\ngrid: {moe.top_k: [1]}\nslurm: {max_parallel: true}\n")),
]


@pytest.mark.parametrize("case", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_broken_sweep_files_fail_with_one_line(case, tmp_path, capsys, tripwires):
    argv, needle = case[1](tmp_path)
    _one_line_error(argv, needle, capsys)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A dense and an MoE model file of the tiny architecture, and a damaged metrics file's run dir."""
    from moe_sys.weights.io import save_model_weights
    from moe_sys.config import load_config
    from moe_sys.models.transformer import TransformerLM

    root = tmp_path_factory.mktemp("models")
    for name, moe in (("dense", "false"), ("moe", "true")):
        cfg = load_config(TINY, [f"moe.enabled={moe}", "model.n_layers=1", "model.d_model=32", "model.d_ff=64"])
        save_model_weights(TransformerLM(cfg.model, cfg.moe, 3).state_dict(), str(root / f"{name}.safetensors"))
    (root / "text.txt").write_text("hello\n")
    return root


def _merge(*args, needle):
    return lambda ws, m: (["merge", *[str(a).format(m=m, ws=ws) for a in args]], needle.format(m=m, ws=ws))


SMALL = ["--set", "model.n_layers=1", "--set", "model.d_model=32", "--set", "model.d_ff=64"]
MERGE_CASES = [
    ("bogus-method", _merge("bogus", "{m}/dense.safetensors", "--out", "{ws}/o.safetensors", needle="'bogus'")),
    ("no-inputs", _merge("average", "--out", "{ws}/o.safetensors", needle="nothing to merge")),
    ("missing-input", _merge("average", "{ws}/nope", "--out", "{ws}/o.safetensors", needle="{ws}/nope")),
    ("text-input", _merge("average", "{m}/text.txt", "--out", "{ws}/o.safetensors", needle="{m}/text.txt")),
    ("dir-input", _merge("average", "{m}", "--out", "{ws}/o.safetensors", needle="{m}")),
    ("weights-count", _merge("average", "{m}/dense.safetensors", "--weights", "1", "2", "--out", "{ws}/o",
                             needle="--weights")),
    ("density-0", _merge("ties", "{m}/dense.safetensors", "--density", "0", "--out", "{ws}/o", needle="--density")),
    ("density-2", _merge("dare_ties", "{m}/dense.safetensors", "--density", "2", "--out", "{ws}/o",
                         needle="--density")),
    ("lam-nan", _merge("task_arithmetic", "{m}/dense.safetensors", "--lam", "nan", "--out", "{ws}/o",
                       needle="--lam")),
    ("rank-0", _merge("average", "{m}/dense.safetensors", "--rank", "0", "--out", "{ws}/o", needle="--rank")),
    ("upcycle-no-base", _merge("upcycle", "--out", "{ws}/o", needle="--base")),
    ("upcycle-missing-base", _merge("upcycle", "--base", "{ws}/nope", *SMALL, "--out", "{ws}/o",
                                    needle="{ws}/nope")),
    ("upcycle-moe-base", _merge("upcycle", "--base", "{m}/moe.safetensors", *SMALL, "--out", "{ws}/o",
                                needle="no dense FFN")),
    ("upcycle-bad-config", _merge("upcycle", "--base", "{m}/dense.safetensors", "--config", "{m}/text.txt",
                                  "--out", "{ws}/o", needle="{m}/text.txt")),
    ("upcycle-bad-set", _merge("upcycle", "--base", "{m}/dense.safetensors", "--set", "moe.top_k=[1",
                               "--out", "{ws}/o", needle="--set moe.top_k")),
]


def _plot(records, needle, out=None):
    def make(ws, m):
        run = ws / "run"
        run.mkdir()
        if records is not None:
            (run / "metrics.jsonl").write_bytes(records)
        if out == "file":
            (ws / "out").write_text("x")
        return ["plot", str(run), *(["--out", str(ws / "out")] if out else [])], needle.format(run=run, ws=ws)
    return make


PLOT_CASES = [
    ("missing-dir", lambda ws, m: (["plot", str(ws / "nope")], str(ws / "nope"))),
    ("file-as-dir", lambda ws, m: (["plot", str(m / "text.txt")], str(m / "text.txt"))),
    ("no-metrics", _plot(None, "{run}/metrics.jsonl")),
    ("empty-metrics", _plot(b"\n", "{run}/metrics.jsonl")),
    ("garbage-line", _plot(b'{"step": 1, "lm_loss": 3.0}\nnot json\n', "{run}/metrics.jsonl:2")),
    ("binary", _plot(bytes(range(256)), "{run}/metrics.jsonl:1")),
    ("not-a-record", _plot(b"[1, 2, 3]\n", "{run}/metrics.jsonl:1")),
    ("wrong-shape", _plot(b'{"step": 1, "expert_load": "high"}\n', "{run}/metrics.jsonl")),
    ("ragged-shape", _plot(b'{"step": 1, "expert_load": [[0.5, 0.5]]}\n{"step": 2, "expert_load": [[1]]}\n',
                           "{run}/metrics.jsonl")),
    ("out-is-file", _plot(b'{"step": 1, "lm_loss": 3.0}\n', "--out {ws}/out", out="file")),
]

# `moe-sys convert` cases go here as (id, make) with make(ws, models) -> (argv, needle).
CONVERT_CASES = []
ARGUMENT_CASES = MERGE_CASES + PLOT_CASES + CONVERT_CASES


@pytest.mark.parametrize("case", ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
def test_bad_merge_and_plot_arguments_fail_with_one_line(case, tmp_path, models, capsys, tripwires):
    argv, needle = case[1](tmp_path, models)
    _one_line_error(argv, needle, capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.safetensors").exists()


def test_resume_without_checkpoints_fails_before_launch(tmp_path, capsys, tripwires):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _one_line_error(["train", TINY, "--resume", "--set", f"logging.run_dir={run_dir}"], "--resume: no checkpoint",
                    capsys)
    assert os.listdir(run_dir) == []


@pytest.mark.parametrize("args, needle", [
    (["--set", "moe.top_k=true"], "moe.top_k:"),
    (["--set", "train.init_from=/nonexistent/weights.safetensors"], "train.init_from:"),
    (["--resume", "--set", "logging.run_dir=RUN"], "--resume: no checkpoint"),
], ids=["bad-type", "init-from-missing", "resume-empty"])
def test_real_train_process_starts_no_launcher(args, needle, tmp_path):
    run_dir = tmp_path / "run"
    args = [a.replace("RUN", str(run_dir)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "moe_sys.cli", "train", TINY, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "deepspeed" not in (proc.stdout + proc.stderr).lower()  # the launcher logs as it starts
    assert not run_dir.exists()


def test_deepspeed_noise_filters_are_scoped_to_their_messages():
    """The two silenced messages are dropped by the filters every `moe-sys` process installs; others pass."""
    import logging
    import warnings

    from deepspeed.utils import logger

    from moe_sys.quiet import silence_known_noise

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_noise()  # in front of "always"
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use x.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]

    def passes(message):
        return logger.filter(logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None))
    assert not passes("Attempting to get learning rate from scheduler before it has started")
    assert passes("Attempting something else")
