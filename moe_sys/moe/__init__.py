"""MoE building blocks. Importing this package registers the built-in routers by name."""
from moe_sys.moe import router_topk  # noqa: F401  (registers "topk")
