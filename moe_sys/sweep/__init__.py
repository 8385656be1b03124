"""Config-driven sweeps: ``moe-sys sweep configs/sweeps/NAME.yaml`` (see moe_sys/sweep/spec.py)."""
from moe_sys.sweep.run import report, run_local, submit_slurm
from moe_sys.sweep.spec import load_sweep

__all__ = ["load_sweep", "run_local", "submit_slurm", "report"]
