"""Training batches for metric learning over several domains, resumable from one integer.

Shape legend: N labelled images, B per-rank batch size, W data-parallel world size, G = B * W.

Global batch g (g = 0, 1, ...) is a pure function of (seed, g): every rank draws the same G
indices and keeps its slice [r*B, (r+1)*B), so ranks see distinct images within a step and the
whole state is ``consumed_samples`` (as in ``moe_sys.data.loader``). A batch is G/m *units*:
  1. each unit picks a domain with probability w_d (``union``: w_d ~ n_d images, i.e. every image
     equally likely, PUMA's plain sampler over the concatenation; ``balanced``: w_d = 1/#domains;
     ``temperature``: w_d ~ n_d^(1/T));
  2. a domain's units are distinct classes drawn uniformly (m >= 2, pytorch-metric-learning's
     ``MPerClassSampler``) or distinct images drawn uniformly (m = 1); a domain asked for more units
     than it has repeats some (only for tiny domains);
  3. each class unit contributes m distinct images of that class, kept next to each other, so with
     B % m == 0 a class never straddles two ranks.
Batches are drawn independently, so the domain mix is exact in expectation and images repeat across
batches at random (no epochs).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch


def domain_weights(images_per_domain: Sequence[int], mode: str, temperature: float = 1.0) -> np.ndarray:
    """w_d for ``mode`` union | balanced | temperature (see the module docstring); sums to 1."""
    if temperature <= 0:
        raise ValueError(f"sampler temperature must be > 0, got {temperature}")
    n_D = np.asarray(images_per_domain, dtype=np.float64)
    raw = {"union": lambda: n_D, "balanced": lambda: np.ones_like(n_D),
           "temperature": lambda: n_D ** (1.0 / temperature)}
    if mode not in raw:
        raise ValueError(f"sampler domains {mode!r}: expected one of {', '.join(raw)}")
    w_D = raw[mode]()
    return w_D / w_D.sum()


class MetricBatchSampler(torch.utils.data.Sampler):
    """Endless per-rank batches of dataset indices; ``batch(g)`` is global batch g's slice for this rank.

    Args:
        labels, domains: [N] class id and domain id of every image (a class id belongs to one domain).
        batch_size: B per rank; m_per_class: m (1 = no class grouping).
        mode, temperature: the domain weighting; dp_rank, dp_size: r and W; seed: same on all ranks.
        consumed_samples: global stream position to start from (from ``state_dict``).
        domain_names: names used in error messages (default "domain <id>").
    """

    def __init__(self, labels, domains, batch_size: int, m_per_class: int = 1, mode: str = "union",
                 temperature: float = 1.0, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 consumed_samples: int = 0, domain_names: Sequence[str] = ()) -> None:
        labels_N, domains_N = np.asarray(labels), np.asarray(domains)
        if labels_N.shape != domains_N.shape or labels_N.ndim != 1:
            raise ValueError(f"labels {labels_N.shape} and domains {domains_N.shape} must be equal-length 1-D arrays")
        if len(labels_N) == 0:
            raise ValueError("the sampler got no labelled images")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if batch_size % m_per_class:
            raise ValueError(f"batch size {batch_size} is not a multiple of m_per_class {m_per_class}")
        self.B, self.m, self.W, self.rank, self.seed = batch_size, m_per_class, dp_size, dp_rank, seed
        self.consumed_samples = consumed_samples
        self.domain_ids = np.unique(domains_N)
        name = dict(enumerate(domain_names))
        self._units = [self._domain_units(labels_N, domains_N, d, name.get(int(d), f"domain {d}"))
                       for d in self.domain_ids]
        self.weights_D = domain_weights([(domains_N == d).sum() for d in self.domain_ids], mode, temperature)

    def _domain_units(self, labels_N, domains_N, d, name: str):
        """Domain d's units: its image indices (m = 1), or a list of each class's image indices."""
        in_domain = np.nonzero(domains_N == d)[0]
        if self.m == 1:
            return in_domain
        units = []
        for label in np.unique(labels_N[in_domain]):
            images = in_domain[labels_N[in_domain] == label]
            if len(images) < self.m:
                raise ValueError(f"class {label} of {name} has {len(images)} image(s), fewer than "
                                 f"m_per_class={self.m}")
            units.append(images)
        return units

    def global_batch(self, g: int) -> np.ndarray:
        """The G indices of global batch g, units of m consecutive images."""
        rng = np.random.default_rng([self.seed, g])
        per_domain = rng.multinomial(self.B * self.W // self.m, self.weights_D)
        chosen = []
        for units, count in zip(self._units, per_domain):
            picks = rng.choice(len(units), size=count, replace=count > len(units))
            if self.m == 1:
                chosen += [units[picks[:, None]]]
            else:
                chosen += [rng.choice(units[u], size=self.m, replace=False)[None] for u in picks]
        units_UM = np.concatenate(chosen)  # [G/m, m]
        return units_UM[rng.permutation(len(units_UM))].reshape(-1)

    def batch(self, g: int) -> List[int]:
        """This rank's B indices of global batch g."""
        return self.global_batch(g)[self.rank * self.B:(self.rank + 1) * self.B].tolist()

    def __iter__(self) -> Iterator[List[int]]:
        """From ``consumed_samples`` on, advancing it as batches are handed out. With DataLoader
        workers (which prefetch), count consumed samples where batches are used instead."""
        while True:
            g = self.consumed_samples // (self.B * self.W)
            self.consumed_samples += self.B * self.W
            yield self.batch(g)

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler was saved with seed {state['seed']}, resuming with {self.seed}")
        self.consumed_samples = int(state["consumed_samples"])
