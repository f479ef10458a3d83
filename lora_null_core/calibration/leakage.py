"""Leakage, the number that says the init worked.

leakage(A, X) = ‖A X‖_F / (‖A‖_F ‖X‖_F / sqrt(d_in)). A random A of the same norm scores about 1; an A whose
rows lie in the null space of X scores near 0. It is scale-free in A, so v1/v2/basis inits compare directly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..distributed import all_reduce_sum_
from ..null_space import row_chunks
from .batches import TokenBatch
from .taps import LayerInput, run_activation_pass


def random_like(lora_a: torch.Tensor, seed: int) -> torch.Tensor:
    """A Gaussian matrix with the Frobenius norm of `lora_a`: the baseline leakage is measured against."""
    return unit_noise(tuple(lora_a.shape), seed, lora_a.device) * lora_a.double().norm()  # no host sync


@functools.lru_cache(maxsize=16)
def unit_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """One seed's Gaussian matrix of unit Frobenius norm, drawn on the CPU (the same on every device) once per shape:
    a model's layers share a few shapes, and drawing it for each of a 7B's 224 layers took 0.5 s on the host."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (noise / noise.norm()).to(device)


def leakage_from_covariance(lora_a: torch.Tensor, covariance: torch.Tensor) -> float:
    """Leakage on the data a covariance Σ x xᵀ summarizes: ‖A X‖² = tr(A C Aᵀ), ‖X‖² = tr(C)."""
    return leakages_from_covariance([lora_a], covariance)[0]


def leakages_from_covariance(lora_as: Sequence[torch.Tensor], covariance: torch.Tensor) -> list[float]:
    """Leakage of each A on one covariance, in one float64 pass over it by row chunks (no float64 copy of C,
    1 GB for a 7B down_proj) and one host sync: the layers sharing an input and their random baselines."""
    device = covariance.device
    stacked = torch.cat([a.to(device=device, dtype=torch.float64) for a in lora_as])
    product = torch.zeros_like(stacked)  # stacked · C, summed over C's row chunks
    start = 0
    for rows in row_chunks(covariance):
        product += stacked[:, start : start + rows.shape[0]] @ rows.to(torch.float64)
        start += rows.shape[0]
    responses = [part.sum() for part in (product * stacked).split([a.shape[0] for a in lora_as])]
    energies = [part.square().sum() for part in stacked.split([a.shape[0] for a in lora_as])]
    trace = covariance.diagonal().to(torch.float64).sum()
    values = torch.stack([*responses, *energies, trace]).tolist()
    count = len(lora_as)
    return [_normalize(values[i], values[count + i], values[-1], covariance.shape[0]) for i in range(count)]


def _normalize(response: float, a_energy: float | torch.Tensor, x_energy: float, d_in: int) -> float:
    denominator = float(a_energy) * float(x_energy) / d_in
    if denominator <= 0:
        return float("nan")
    return math.sqrt(max(float(response), 0.0) / denominator)


class LeakageCollector:
    """Visitor summing ‖A x‖², ‖R x‖² (random A) and ‖x‖² per module, without any d_in × d_in matrix."""

    def __init__(self, lora_as: Mapping[str, torch.Tensor], seed: int) -> None:
        self.a = {name: a.to(torch.float64) for name, a in lora_as.items()}
        self.random = {name: random_like(a, seed) for name, a in self.a.items()}
        self.sums = {name: torch.zeros(3, dtype=torch.float64, device=a.device) for name, a in self.a.items()}

    def __call__(self, name: str, inputs: LayerInput, _same_as: str | None) -> None:
        x = inputs.masked.to(torch.float64)  # padding rows are zero and add nothing to the three sums
        a, r = self.a[name].to(x.device), self.random[name].to(x.device)
        self.sums[name] += torch.stack([(x @ a.T).square().sum(), (x @ r.T).square().sum(), x.square().sum()]).to(
            self.sums[name].device
        )

    def results(self) -> dict[str, tuple[float, float]]:
        """(leakage, random-A leakage) per module, summed over every process."""
        result = {}
        for name in sorted(self.sums):
            a_response, r_response, x_energy = all_reduce_sum_(self.sums[name]).tolist()
            a = self.a[name]
            norm = a.square().sum()
            result[name] = (
                _normalize(a_response, norm, x_energy, a.shape[1]),
                _normalize(r_response, norm, x_energy, a.shape[1]),
            )
        return result


def holdout_leakage(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    lora_as: Mapping[str, torch.Tensor],
    batches: Iterable[TokenBatch],
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """(leakage, random-A leakage) per module on text that did not enter the covariance."""
    collector = LeakageCollector(lora_as, seed)
    run_activation_pass(model, modules, batches, collector, desc="held-out leakage")
    return collector.results()
