"""MoE building blocks. Importing this package registers the built-in routers by name."""
from moe_sys.moe import router_example, router_expert_choice, router_task, router_topk  # noqa: F401
