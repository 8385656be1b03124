"""Every metric loss on 2 gloo ranks with gathered negatives equals 1 rank on the concatenated batch:
the same loss value, the same gradients after data-parallel averaging (projector and the loss's own
proxies / class weights), the same loss state (CurricularFace's t). Retrieval metrics over uneven
per-rank shards equal those of the pooled set. One spawned group runs every case."""
import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks

B, F_IN, D, C, WORLD = 6, 5, 8, 4, 2


def _global_batch():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(WORLD * B, F_IN, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 3, 0, 2])  # positives sit on the other rank too
    return x, labels


def _build(name, gather):
    from moe_sys.config.metric import LossSpec
    from moe_sys.metric.projector import Projector
    from moe_sys.metric.registry import build_loss

    torch.manual_seed(0)
    proj = Projector(F_IN, D, kind="mlp", hidden=7).double()
    loss = build_loss(LossSpec(name=name, gather=gather), C, D).double()
    return proj, loss


def _step(proj, loss, x, labels):
    value = loss(proj(x), labels)
    value.backward()
    return value.detach()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _loss_case(rank, world, name):
    x, labels = _global_batch()
    proj, loss = _build(name, gather=True)
    mine = slice(rank * B, (rank + 1) * B)
    value = _step(proj, loss, x[mine], labels[mine])
    ref_proj, ref_loss = _build(name, gather=False)
    ref_value = _step(ref_proj, ref_loss, x, labels)
    errs = {"loss": _rel(value, ref_value)}
    ours = dict(proj.named_parameters()) | {f"loss.{k}": v for k, v in loss.named_parameters()}
    ref = dict(ref_proj.named_parameters()) | {f"loss.{k}": v for k, v in ref_loss.named_parameters()}
    for key, p in ours.items():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        errs[f"grad {key}"] = _rel(grad / world, ref[key].grad)  # DeepSpeed/DDP average over DP ranks
    for key, buf in loss.named_buffers():
        errs[f"buffer {key}"] = _rel(buf, dict(ref_loss.named_buffers())[key])
    return errs


def _retrieval_case(rank, world):
    from moe_sys.eval.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(5)
    emb, labels = torch.randn(30, 4, generator=g), torch.randint(0, 5, (30,), generator=g)
    domains = (torch.arange(30) % 3 == 0).long()
    solo = [dist.new_group([r]) for r in range(world)]  # a one-rank group: no gathering
    pooled = retrieval_metrics(emb, labels, domains, group=solo[rank])
    shard = slice(0, 17) if rank == 0 else slice(17, 30)  # uneven shards
    ours = retrieval_metrics(emb[shard], labels[shard], domains[shard])
    assert ours.keys() == pooled.keys() and len(ours) == 4 * 6
    return max(abs(ours[k] - pooled[k]) for k in ours)


def _all_cases(rank, world):
    from moe_sys.metric.registry import LOSSES

    return {"losses": {name: _loss_case(rank, world, name) for name in LOSSES},
            "retrieval": _retrieval_case(rank, world)}


def test_gathered_losses_and_retrieval_equal_one_rank():
    results = run_ranks(_all_cases, WORLD)
    for rank, result in enumerate(results):
        for name, errs in result["losses"].items():
            bad = {k: v for k, v in errs.items() if v > 1e-9}
            assert not bad, f"rank {rank} {name}: {bad}"
        assert result["retrieval"] < 1e-7, result["retrieval"]
