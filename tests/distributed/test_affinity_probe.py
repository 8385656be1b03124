"""The affinity probe under the real DeepSpeed engine (ZeRO 0, fp32, AdamW) on two gloo ranks: training
with it is bit for bit training without it (losses, parameters, optimizer state), both ranks record the
same matrices, and they equal a direct re-computation on the global batch with a twin AdamW.

One spawn runs every case: process start-up dominates.
"""
import copy

import torch
import torch.distributed as dist

from tests.distributed.spawn import run_ranks

STEPS, EVERY = 6, 3  # DeepSpeed's warm-up gives steps 1 and 2 lr 0 (no lookahead)
SETS = ["model.arch=vit", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.d_ff=32",
        "model.vit.image_size=32", "model.vit.patch_size=8", "model.vit.in_channels=1", "moe.enabled=false",
        "task.type=multitask", "task.multitask.tasks=[S,D,N]", "task.multitask.num_train=24",
        "task.multitask.num_test=4", "task.multitask.decoder.hidden=8", "train.micro_batch_size=3",
        "train.lr=0.01", "train.warmup_steps=1", f"train.steps={STEPS}", "train.weight_decay=0.1"]


def _train(rank, world, every, snapshot=None):
    """STEPS train steps; (losses, records, parameters, optimizer state); ``snapshot`` gets what the
    first measured step saw before its probe (model, optimizer state, batch, lr)."""
    from moe_sys.config import load_config
    from moe_sys.tasks import build_task
    from moe_sys.train import trainer

    cfg = load_config(None, SETS + [f"task.multitask.affinity.every={every}"],
                      world_size=world)
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    engine = trainer._build_engine(task, cfg, world)
    feed, _ = task.build_feeds(rank, world)
    if snapshot is not None:
        probe = task.probe

        def watched(engine, batch, step):
            if step == EVERY:
                snapshot.update(model=copy.deepcopy(engine.module), batch=batch, lr=engine.optimizer.param_groups[0]["lr"],
                                state=copy.deepcopy(engine.optimizer.state_dict()))
            return probe(engine, batch, step)
        task.probe = watched
    losses, measured = [], []
    for step in range(1, STEPS + 1):
        record, probed = trainer.train_step(task, engine, feed, cfg, step)
        losses.append(record["loss"])
        measured.append(probed)
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return losses, measured, params, engine.optimizer.state_dict(), task, cfg, task.affinity.shared(engine.module)


def _direct(task, cfg, snap, world, shared):
    """Z and C from the per-task losses averaged over every rank's batch (the global batch): gradients by
    backward on deep copies, the lookahead by a real AdamW step of a twin built like the trainer's."""
    from moe_sys.train.optim import build_optimizer

    batches = [None] * world
    dist.all_gather_object(batches, snap["batch"])
    model = snap["model"]

    def global_losses(m):
        return sum(torch.stack(list(task.per_task_losses(task.forward(m, b), b).values())) for b in batches) / world

    base = global_losses(model).detach()
    rows, grads = [], []
    for i in range(len(task.tasks)):
        twin = copy.deepcopy(model)
        params = dict(twin.named_parameters())
        global_losses(twin)[i].backward()
        grads.append(torch.cat([params[n].grad.reshape(-1) for n in shared]))
        opt = build_optimizer(twin, cfg.train)
        opt.load_state_dict(copy.deepcopy(snap["state"]))
        for group in opt.param_groups:
            group["lr"] = snap["lr"]
        for n, p in params.items():
            if n not in shared:
                p.grad = None
        opt.step()
        with torch.no_grad():
            rows.append(1 - global_losses(twin) / base)
    g = torch.stack(grads).double()
    g = g / g.norm(dim=1, keepdim=True)
    return torch.stack(rows), (g @ g.T).float()


def _cases(rank, world):
    snap = {}
    on = _train(rank, world, EVERY, snap)
    off = _train(rank, world, 0)
    out = {"losses": on[0] == off[0],
           "params": all(torch.equal(p, off[2][n]) for n, p in on[2].items()),
           "opt_state": _same_state(on[3], off[3]),
           "measured_at": [bool(m) for m in on[1]], "records": on[1]}
    z, c = _direct(on[4], on[5], snap, world, on[6])
    entry = on[1][EVERY - 1]["affinity"]
    out["lookahead_err"] = float((torch.tensor(entry["lookahead"]) - z).abs().max() / z.abs().max())
    out["cosine_err"] = float((torch.tensor(entry["cosine"]) - c).abs().max())
    out["z"], out["shared"] = z, on[6]
    return out


def _same_state(a, b):
    return a["param_groups"] == b["param_groups"] and all(
        torch.equal(a["state"][k][name], value) for k, entries in b["state"].items() for name, value in entries.items())


def test_probe_is_exact_and_equals_a_direct_recomputation():
    ranks = run_ranks(_cases, 2)
    for out in ranks:
        assert out["losses"] and out["params"] and out["opt_state"], "the probe changed training"
        assert out["measured_at"] == [step % EVERY == 0 for step in range(1, STEPS + 1)]
        assert out["lookahead_err"] < 1e-4 and out["cosine_err"] < 1e-5, out
        assert out["shared"] and all(n.startswith("encoder.") for n in out["shared"])
        entry = out["records"][EVERY - 1]["affinity"]
        assert entry["tasks"] == ["S", "D", "N"] and entry["lookahead_step"] == "AdamW"
        assert not torch.allclose(out["z"], out["z"].T)  # the lookahead affinity is asymmetric
    for entry in (m["affinity"] for out in ranks for m in out["records"] if m):
        entry.pop("seconds")  # the one value of its own per rank
    assert ranks[0]["records"] == ranks[1]["records"], "the ranks measured different matrices"
    last = ranks[0]["records"][-1]["affinity"]  # the running mean of the two measurements
    first = ranks[0]["records"][EVERY - 1]["affinity"]
    expected = (torch.tensor(first["lookahead"], dtype=torch.float64) + torch.tensor(last["lookahead"], dtype=torch.float64)) / 2
    torch.testing.assert_close(torch.tensor(last["lookahead_mean"], dtype=torch.float64), expected)
