"""``moe-sys plan``: will a config fit, and what will its all-to-all and its imbalance cost."""
