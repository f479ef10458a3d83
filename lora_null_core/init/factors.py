"""Writing a step's layers once their null bases are known: the factors (and residual) of each layer, then the
figures the report keeps for it (leakage of its A and of a random A, on the calibration and the held-out data)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer

from ..calibration.covariances import Covariances
from ..calibration.leakage import leakages_from_covariance, random_like
from ..config import LoraNullConfig
from ..report import LayerReport
from . import phases
from .peft_layers import write_adapter
from .phases import phase


def write_layers(
    layers: Mapping[str, LoraLayer], covariances: Covariances, null_bases, config: LoraNullConfig, adapter_name: str
) -> tuple[list[LayerReport], dict[str, torch.Tensor]]:
    """Factors (and residual) from each layer's null basis; the layers' leakage figures and their A matrices."""
    lora_as = {}
    for name, layer in layers.items():
        basis = null_bases[covariances.group_of[name], layer.r[adapter_name]]
        with phase(phases.WRITE):
            lora_as[name] = write_adapter(
                layer, adapter_name, basis, config.init, config.applied_a_scale(), config.residual
            )
    with phase(phases.REPORT):
        return layer_reports(layers, adapter_name, covariances, lora_as, config.seed), lora_as


def layer_reports(
    layers: Mapping[str, LoraLayer],
    adapter_name: str,
    covariances: Covariances,
    lora_as: Mapping[str, torch.Tensor],
    seed: int,
) -> list[LayerReport]:
    """Each layer's leakage and a random A's, one pass over each covariance for all the layers reading it."""
    leakage = {}
    for group in dict.fromkeys(covariances.group_of[name] for name in layers):
        names = [name for name in layers if covariances.group_of[name] == group]
        matrices = [m for name in names for m in (lora_as[name], random_like(lora_as[name], seed))]
        values = leakages_from_covariance(matrices, covariances.matrices[group])
        leakage.update({name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(names)})
    return [
        LayerReport(
            name=name,
            d_in=layer.in_features,
            d_out=layer.out_features,
            rank=layer.r[adapter_name],
            covariance=covariances.group_of[name],
            tokens=covariances.tokens[covariances.group_of[name]],
            leakage=leakage[name][0],
            leakage_random=leakage[name][1],
        )
        for name, layer in layers.items()
    ]


def set_holdout(reports: list[LayerReport], measured: Mapping[str, tuple[float, float]]) -> None:
    for entry in reports:
        if entry.name in measured and not math.isnan(measured[entry.name][0]):
            entry.leakage_holdout, entry.leakage_holdout_random = measured[entry.name]
