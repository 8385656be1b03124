"""Offline analysis of runs: plots (moe-sys plot) and the routing study."""
