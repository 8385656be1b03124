import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def run_cli(*args, timeout=600, env=None):
    """Run `moe-sys ARGS` as a user would (a fresh process; train starts the deepspeed launcher)."""
    proc = subprocess.run([sys.executable, "-m", "moe_sys.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    return proc


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def quick_sets(tmp_path):
    """Overrides that make the tiny config run in seconds and keep its files in tmp_path."""
    return ["--set", f"data.cache_dir={tmp_path.parent / 'moe_sys_cache'}", "--set", "logging.progress_bar=false",
            "--set", "logging.tensorboard=false"]
