"""The weight prior (experimental, #49): the knowledge covariance the bases are solved from becomes C/tr + β·G/tr,
G = Σ WᵀW over the layers reading that input. The input directions a weight responds to most carry knowledge (the
PiSSA/MiLoRA observation), so where the calibration samples are thin (the model's own text) the solve still
avoids them. Both terms are scaled to trace d_in, so β means the same in every layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer

from ..calibration.covariances import Covariances
from ..null_space import unit_trace
from ..weights import gathered, weight_of
from .peft_layers import weight_matrix


def with_weight_prior(covariances: Covariances, layers: Mapping[str, LoraLayer], beta: float) -> Covariances:
    """The covariances to solve from (a copy: the report's energies and the cache keep the measured ones)."""
    grams: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        group = covariances.group_of[name]
        target = covariances.matrices[group]
        with gathered([weight_of(layer.get_base_layer())]):
            weight = weight_matrix(layer).detach().to(target.device, torch.float32)
            gram = weight.T @ weight
        grams[group] = grams[group] + gram if group in grams else gram
    matrices = {
        group: unit_trace(matrix.to(torch.float64)) + beta * unit_trace(grams[group].to(torch.float64))
        if group in grams
        else matrix
        for group, matrix in covariances.matrices.items()
    }
    return dataclasses.replace(covariances, matrices=matrices)
