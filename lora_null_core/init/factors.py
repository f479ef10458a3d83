"""Writing a step's layers once their null bases are known: the factors (and residual) of each layer into PEFT's
A and B, then the figures the report keeps for it (leakage of its A and of a random A, on the calibration and the
held-out data)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer

from ..calibration.covariances import Covariances
from ..calibration.leakage import leakages_from_covariance, random_like
from ..config import LoraNullConfig
from ..distributed import broadcast_
from ..null_space import basis_factors, projected_factors, row_chunks
from ..report import LayerReport
from ..weights import gathered, weight_of
from . import phases
from .peft_layers import factor_weights, layer_widths, weight_matrix
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
            d_in=layer_widths(layer)[0],
            d_out=layer_widths(layer)[1],
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


def write_adapter(
    layer: LoraLayer, adapter_name: str, basis: torch.Tensor, init: str, a_scale: float = 1.0, residual: bool = True
) -> torch.Tensor:
    """Write A, B (and, for the projected init on the residual, the residual base) into one layer; return A.
    `a_scale` moves magnitude from B to A (B·A unchanged): with Adam a larger frozen A is a faster adapter.
    Without `residual` the projected init keeps B₀·A₀ inside the untouched base and starts B at 0: for a frozen
    A the same training, and the trained adapter is a standard LoRA for the original weights."""
    lora_a_param, lora_b_param = factor_weights(layer, adapter_name)
    scaling = layer.scaling[adapter_name]
    base_weight = weight_of(layer.get_base_layer())
    with gathered([base_weight, lora_a_param, lora_b_param], modify=True):
        if init == "projected":
            original = weight_matrix(layer).detach()
            lora_a, lora_b = projected_factors(original, basis.to(original.device), scaling)
        else:
            lora_a, lora_b = basis_factors(basis, layer_widths(layer)[1])
        lora_a, lora_b = lora_a * a_scale, lora_b / a_scale if residual else torch.zeros_like(lora_b)
        # Rank 0's factors everywhere: identical adapters on every process, whatever the SVD's last bits did.
        broadcast_(lora_a)
        broadcast_(lora_b)
        with torch.no_grad():
            lora_a_param.copy_(lora_a.to(lora_a_param.device))
            lora_b_param.copy_(lora_b.to(lora_b_param.device))
            if init == "projected" and residual:
                write_residual(layer, lora_a_param, lora_b_param, scaling)
        return lora_a_param.detach().clone()  # a ZeRO-3 partition empties the parameter on the way out


def write_residual(layer: LoraLayer, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
    """W_res = W − s·B·A with the stored (rounded) factors, so W_res + s·B·A equals W to the precision of
    W_res's own dtype. In float64 row chunks: a full float64 copy of a 70B down_proj would be 1.9 GB."""
    original = weight_matrix(layer).detach()  # shares the parameter's storage
    lora_a = lora_a.detach().to(original.device, torch.float64)
    lora_b = lora_b.detach().to(original.device, torch.float64)
    start = 0
    for rows in row_chunks(original):
        end = start + rows.shape[0]
        rows.copy_(rows.double() - scaling * lora_b[start:end] @ lora_a)  # views: writes into the base weight
        start = end
