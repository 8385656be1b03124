"""Analysis of runs and models: plots (moe-sys plot), the routing study, task affinity and grouping."""
