"""Pure tensor math of the method: the null basis of a covariance and the LoRA factors built on it."""

from __future__ import annotations

import math

import torch

from .errors import InvalidRankError


def eigendecompose(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric covariance, solved in float64.

    float64 because the smallest eigenvalues are the ones we keep, and they are the first to drown in
    float32 rounding when the spectrum spans many decades.
    """
    symmetric = covariance.to(torch.float64)
    symmetric = (symmetric + symmetric.T) / 2
    values, vectors = torch.linalg.eigh(symmetric)
    return values, vectors


def null_basis(covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """(d_in, rank) orthonormal basis of the `rank` input directions the activations use least."""
    d_in = covariance.shape[0]
    if not 0 < rank < d_in:
        raise InvalidRankError(f"rank {rank} must be between 1 and d_in - 1 = {d_in - 1} to leave a null space.")
    return eigendecompose(covariance)[1][:, :rank].contiguous()


def projected_factors(weight: torch.Tensor, basis: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Null's A (r, d_in) and B (d_out, r) with scaling · B A = W U Uᵀ, the weight on the null space.

    The SVD of the small (d_out, r) matrix W U gives the factorization; no (d_out, d_in) SVD is needed:
    W U = U' Σ' Q'ᵀ  ⇒  W U Uᵀ = U' Σ' (U Q')ᵀ.
    """
    d_out, rank = weight.shape[0], basis.shape[1]
    if rank > d_out:
        raise InvalidRankError(f"rank {rank} exceeds the layer's output width {d_out}; use a rank ≤ {d_out}.")
    projected = weight.to(torch.float64) @ basis.to(torch.float64)
    left, singular, right_t = torch.linalg.svd(projected, full_matrices=False)
    root = singular.sqrt() / math.sqrt(scaling)
    lora_b = (left * root).contiguous()
    lora_a = (root.unsqueeze(1) * (right_t @ basis.to(torch.float64).T)).contiguous()
    return lora_a, lora_b


def basis_factors(basis: torch.Tensor, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis init: A = Uᵀ (unit rows in the null space), B = 0, base weight untouched."""
    return basis.to(torch.float64).T.contiguous(), basis.new_zeros(d_out, basis.shape[1], dtype=torch.float64)


def effective_rank(covariance_or_values: torch.Tensor) -> float:
    """Entropy effective rank exp(H(p)), p = λ / Σλ (Roy & Vetterli), of a covariance or its eigenvalues."""
    values = covariance_or_values
    if values.dim() == 2:
        values = torch.linalg.eigvalsh(values.to(torch.float64))
    values = values.to(torch.float64).clamp_min(0)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))
