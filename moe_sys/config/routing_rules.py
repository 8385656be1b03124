"""Cross-field rules of ``moe.router`` / ``moe.balance``: one line per problem, naming the key.

Kept apart from schema.py so the schema stays a list of fields; imported by MoEConfig.check.
"""
from __future__ import annotations

from typing import List

NONCAUSAL = {
    "expert_choice": "each expert picks its top tokens across the whole micro-batch, so whether a token is "
                     "processed depends on later tokens",
    "example": "the routing decision pools the whole sequence, so early tokens are routed by later ones",
}


def routing_problems(moe, num_domains: int) -> List[str]:
    r = moe.router
    return [line for rule in (_causality, _groups, _sampling, _softmax_k1, _task, _capacity, _balance)
            for line in rule(moe, r, num_domains)]


def _causality(moe, r, num_domains):
    if r.type in NONCAUSAL and not r.allow_noncausal:
        yield (f"moe.router.type: {r.type} routing is not causal ({NONCAUSAL[r.type]}): in this causal LM that leaks "
               "future tokens; set moe.router.allow_noncausal: true to accept it")


def _groups(moe, r, num_domains):
    if (r.num_groups is None) != (r.group_topk is None):
        yield "moe.router.group_topk: group-limited routing needs both num_groups and group_topk (or neither)"
        return
    if r.num_groups is None:
        return
    if r.type not in ("topk", "example") and not (r.type == "task" and r.task_table is None):
        yield f"moe.router.num_groups: group-limited routing applies to top-k choices, not to {r.type} routing"
    elif moe.num_experts % r.num_groups:
        yield f"moe.router.num_groups: {r.num_groups} does not divide moe.num_experts={moe.num_experts}"
    elif not r.group_topk <= min(r.num_groups, moe.top_k):
        yield (f"moe.router.group_topk: {r.group_topk} must be at most num_groups={r.num_groups} and "
               f"top_k={moe.top_k} (a group's score sums its best top_k/group_topk experts)")
    elif moe.top_k > r.group_topk * (moe.num_experts // r.num_groups):
        yield (f"moe.router.group_topk: {r.group_topk} groups of {moe.num_experts // r.num_groups} experts "
               f"hold fewer than top_k={moe.top_k} experts")


def _sampling(moe, r, num_domains):
    if r.sample_second and (moe.top_k < 2 or r.score != "softmax" or r.type == "expert_choice"):
        yield ("moe.router.sample_second: samples slots 2..K from the softmax; needs top_k >= 2, score: softmax "
               "and a top-k router")


def _softmax_k1(moe, r, num_domains):
    if r.score == "softmax" and not r.pre_softmax and moe.top_k == 1 and r.type != "expert_choice":
        yield ("moe.router.pre_softmax: false with top_k=1 gives every token weight 1.0, so the LM loss never "
               "reaches the router; use pre_softmax: true")
    if r.type == "expert_choice" and r.normalize:
        yield ("moe.router.normalize: expert_choice weights are the experts' affinities for the token; "
               "renormalising them is not defined")


def _task(moe, r, num_domains):
    if r.task_table is None:
        return
    if r.type != "task":
        yield f"moe.router.task_table: only read by type: task (type is {r.type})"
    elif len(r.task_table) < num_domains:
        yield f"moe.router.task_table: {len(r.task_table)} rows for {num_domains} data.domains (one row per domain)"
    for a, row in enumerate(r.task_table):
        if len(row) != moe.top_k or len(set(row)) != len(row) or not all(0 <= e < moe.num_experts for e in row):
            yield (f"moe.router.task_table.{a}: {row} must be top_k={moe.top_k} distinct expert ids in "
                   f"[0, {moe.num_experts})")


def _capacity(moe, r, num_domains):
    if r.type in ("example", "task") and (moe.capacity_factor is not None or moe.eval_capacity_factor is not None):
        yield (f"moe.capacity_factor: {r.type} routing sends whole sequences to experts and is dropless; "
               "capacity dropping would split them (set it to null)")


def _balance(moe, r, num_domains):
    b = moe.balance
    types = [term.type for term in b.losses]
    if len(set(types)) != len(types):
        yield f"moe.balance.losses: each type at most once, got {types}"
    fixed = r.type == "task" and r.task_table is not None
    if fixed and any(term.coef > 0 for term in b.losses):
        yield ("moe.balance.losses: a fixed task_table has no learned router to balance; "
               "set moe.balance.losses: []")
    if b.bias.enabled and (fixed or r.type == "expert_choice"):
        yield (f"moe.balance.bias.enabled: {'a fixed task_table' if fixed else 'expert_choice'} does not rank "
               "experts per token, so a selection bias has no effect")
