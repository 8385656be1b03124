"""Language modelling: the byte-level MoE transformer on the text corpus, next-token cross-entropy."""
from __future__ import annotations

from typing import Any, Dict, Iterator

import torch
import torch.distributed as dist

from moe_sys.weights import io as weights_io
from moe_sys.models.transformer import TransformerLM, lm_loss, token_losses
from moe_sys.tasks.base import Task
from moe_sys.train.data_feed import build_feeds, save_tokenizer
from moe_sys.train.distributed import global_sum, to_device


class LMTask(Task):
    throughput_key, throughput_label = "tokens_per_s", "tok/s"
    progress_keys = {"val_loss": "val"}

    def build_model(self):
        cfg = self.cfg
        model = TransformerLM(cfg.model, cfg.moe, num_domains=len(cfg.data.domains))
        if cfg.train.init_from:
            weights_io.load_model_weights(model, cfg.train.init_from)
        return model

    def build_feeds(self, rank, world):
        feeds = build_feeds(self.cfg, rank, world)
        if rank == 0:  # the run dir keeps the data's BPE tokenizer for `generate` and `convert to-hf`
            save_tokenizer(self.cfg, self.cfg.logging.run_dir)
        return feeds

    def forward(self, model, batch):
        return model(batch["tokens"], batch["domain_ids"])

    def loss(self, out, batch):
        lm = lm_loss(out.logits_BSV, batch["labels"], batch["loss_mask"])
        return lm, {"lm": lm}

    def units(self, batch):
        return batch["tokens"].numel()

    @torch.no_grad()
    def evaluate(self, model, batches: Iterator[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
        """Mean held-out LM loss over one pass of the validation batches (the same ones every time), and
        each domain's token-weighted loss (NaN for a domain with no validation tokens)."""
        domains, device = self.cfg.data.domains, model.device
        total, count = torch.zeros(1, device=device), 0
        sums_A, tokens_A = torch.zeros(len(domains), device=device), torch.zeros(len(domains), device=device)
        for batch in batches:
            batch = to_device(batch, device)
            out = model(batch["tokens"], batch["domain_ids"])
            ce_BS = token_losses(out.logits_BSV, batch["labels"]) * batch["loss_mask"]
            total += ce_BS.sum() / batch["loss_mask"].sum().clamp_min(1.0)
            sums_A.index_add_(0, batch["domain_ids"], ce_BS.sum(1))
            tokens_A.index_add_(0, batch["domain_ids"], batch["loss_mask"].sum(1))
            count += 1
        total, sums_A, tokens_A = global_sum(torch.cat([total / max(count, 1), sums_A, tokens_A])).split(
            [1, len(domains), len(domains)])
        per_domain = (sums_A / tokens_A).tolist()
        return {"val_loss": float(total) / dist.get_world_size(),
                "val_loss_domain": {d.name: loss for d, loss in zip(domains, per_domain)}}
