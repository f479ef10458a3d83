"""Pure tensor math of the method: the null basis of a covariance and the LoRA factors built on it."""

from __future__ import annotations

import logging
import math

import torch

from .errors import InvalidRankError

logger = logging.getLogger(__name__)


def eigendecompose(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric covariance, solved in float64.

    float64 because the smallest eigenvalues are the ones we keep, and they are the first to drown in
    float32 rounding when the spectrum spans many decades.
    """
    # eigh reads only the lower triangle, so no symmetrized copy is needed (it would cost another d² float64).
    values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    return values, vectors


def null_basis(covariance: torch.Tensor, rank: int, solver: str = "auto") -> torch.Tensor:
    """(d_in, rank) orthonormal basis of the `rank` input directions the activations use least.

    eigh64: full eigendecomposition in float64 (exact; the default). eigh32: the same in float32 (faster on
    GPUs). subspace: a shift-inverted block Krylov space in float64 (fastest for wide layers; approximate,
    judged by the energy it reaches against eigh64, see benchmarks/speed). auto: subspace on a GPU, where
    eigh64 dominates the run (68 s against 12 s for a Llama-2-7B shape on an H100, energy within 1.06× of
    eigh64 there), eigh64 on the CPU.
    """
    solver = resolved_solver(solver, covariance)
    d_in = covariance.shape[0]
    if not 0 < rank < d_in:
        raise InvalidRankError(f"rank {rank} must be between 1 and d_in - 1 = {d_in - 1} to leave a null space.")
    if solver == "subspace":
        return subspace_null_basis(covariance, rank)
    if solver == "eigh32":
        vectors = torch.linalg.eigh(covariance.to(torch.float32))[1][:, :rank]
        return vectors.to(torch.float64).contiguous()
    return eigendecompose(covariance)[1][:, :rank].contiguous()


def resolved_solver(solver: str, covariance: torch.Tensor) -> str:
    """auto: the subspace solver on a GPU for inputs at least 1,024 wide, eigh64 elsewhere (see null_basis)."""
    if solver != "auto":
        return solver
    return "subspace" if covariance.is_cuda and covariance.shape[0] >= 1024 else "eigh64"


def task_aware_basis(
    knowledge: torch.Tensor, task: torch.Tensor, rank: int, mix: float, solver: str = "auto"
) -> torch.Tensor:
    """(d_in, rank) orthonormal basis of the directions knowledge inputs use least *relative to* task inputs: the
    `rank` generalized eigenvectors of C_k u = λ (C_t + mix·I) u with the smallest λ, each covariance normalized
    to trace d_in first, so `mix` means the same in every layer. As mix → ∞ this is the plain null basis; a small
    mix favours directions the fine-tuning data uses. Solved by a float64 Cholesky factor L of C_t + mix·I (C_t's
    negative eigenvalues, which are rounding, set to zero first when they make it fail): the bottom eigenvectors Y
    of the whitened L⁻¹ C_k L⁻ᵀ give u = L⁻ᵀ Y. Y comes from `null_basis` with `solver`; for the subspace solver
    the whitened matrix is handed over in C_k's own precision, so its shift stays at the rounding level of C_k's
    sums."""
    d_in = knowledge.shape[0]
    if not 0 < rank < d_in:
        raise InvalidRankError(f"rank {rank} must be between 1 and d_in - 1 = {d_in - 1} to leave a null space.")
    eye = torch.eye(d_in, dtype=torch.float64, device=knowledge.device)
    k, t = (unit_trace(m.to(torch.float64)) for m in (knowledge, task))
    factor = _cholesky_of_shifted((t + t.T) / 2, mix, eye)
    del eye, t
    half = torch.linalg.solve_triangular(factor, (k + k.T) / 2, upper=False)  # L⁻¹ C_k
    del k
    whitened = torch.linalg.solve_triangular(factor, half.T, upper=False)  # L⁻¹ C_k L⁻ᵀ (C_k symmetric)
    del half
    whitened = (whitened + whitened.T) / 2
    solver = resolved_solver(solver, whitened)
    if solver == "subspace":
        whitened = whitened.to(knowledge.dtype)
    vectors = null_basis(whitened, rank, solver).to(torch.float64)
    directions = torch.linalg.solve_triangular(factor.T, vectors, upper=True)
    return torch.linalg.qr(directions).Q.contiguous()


def _cholesky_of_shifted(covariance: torch.Tensor, shift: float, eye: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of covariance + shift·I. A covariance summed in float32 comes out slightly indefinite
    (Qwen2.5's, whose few massive activation channels hold most of the trace, by more than a shift of 0.01): its
    negative eigenvalues are rounding, so they are set to zero, and the factor is taken of that nearest PSD matrix."""
    factor, info = torch.linalg.cholesky_ex(covariance + shift * eye)
    if int(info) == 0:
        return factor
    values, vectors = torch.linalg.eigh(covariance)
    repaired = (vectors * values.clamp(min=0)) @ vectors.T
    return torch.linalg.cholesky((repaired + repaired.T) / 2 + shift * eye)


def unit_trace(matrix: torch.Tensor) -> torch.Tensor:
    """Scaled to trace d (an average direction then holds energy 1); a zero matrix stays zero."""
    trace = float(torch.trace(matrix))
    return matrix * (matrix.shape[0] / trace) if trace > 0 else matrix


def subspace_null_basis(
    covariance: torch.Tensor, rank: int, oversample: int = 16, steps: int = 4, solves: str | None = None
) -> torch.Tensor:
    """Bottom-`rank` eigenvectors by Rayleigh–Ritz on a block Krylov space of (C + δI)⁻¹, from a Cholesky factor.

    One Cholesky of C + δI costs d³/3; each step is two triangular solves with rank + oversample right-hand
    sides. A block Krylov space keeps every step's block, so 4 solves are enough (bottom-r energy 1.03–1.06× of
    eigh64 on the Llama-2-7B shape's covariances; held-out leakage 0.98–1.00× of eigh64's on SmolLM2's;
    benchmarks/speed). Real covariances are rank-deficient, and summed in float32 their null
    directions come out slightly negative (SmolLM2's down_proj inputs: about 50 eigenvalues down to
    −3e-9·λ_max). δ is therefore set at the rounding level of the sums, eps(dtype)·λ_max (λ_max from a few power
    steps), not of the mean diagonal; δ moves no eigenvector, and eigenvalues below it are rounding anyway.
    Should the factorization still fail, δ grows 10-fold (up to three times), then the exact float64 eigh takes
    over. Memory: one d×d float64 copy, factorized with out= itself. Fixed seed: every process computes the
    same basis.

    `solves` says how the triangular solves run (TriangularSolves; default blocked on a GPU, where a plain
    triangular solve of a few columns is latency-bound, narrow elsewhere).
    """
    d, width = covariance.shape[0], rank + oversample
    if (steps + 1) * width >= d:  # the space would be the whole space: solve exactly, it is small
        return eigendecompose(covariance)[1][:, :rank].contiguous()
    generator = torch.Generator(device="cpu").manual_seed(0)
    top = largest_eigenvalue(covariance, generator)
    if not math.isfinite(top):
        raise torch.linalg.LinAlgError("covariance is not finite.")
    rounding = max(torch.finfo(covariance.dtype).eps, d * torch.finfo(torch.float64).eps)
    shift = rounding * max(top, 0.0) + torch.finfo(torch.float64).tiny
    factor = covariance.to(torch.float64, copy=True)
    info = torch.empty((), dtype=torch.int32, device=factor.device)
    for attempt in range(4):
        if attempt:
            factor.copy_(covariance)
        factor.diagonal().add_(shift)
        torch.linalg.cholesky_ex(factor, out=(factor, info))  # lower triangle only; C's upper half is never read
        if int(info) == 0:
            break
        logger.debug("Cholesky of covariance + %.1e·I failed at pivot %d; raising the shift.", shift, int(info))
        shift *= 10
    else:
        logger.info("Covariance too indefinite for the subspace solver (d=%d): solving it with eigh64.", d)
        del factor
        return eigendecompose(covariance)[1][:, :rank].contiguous()
    inverse = TriangularSolves(factor, solves or ("blocked" if factor.is_cuda else "narrow"))
    start = torch.randn(d, width, generator=generator, dtype=torch.float64).to(factor.device)
    blocks = [torch.linalg.qr(start)[0]]
    for _ in range(steps):
        step = inverse(blocks[-1])  # (C + δI)⁻¹ · the last block
        for known in blocks:  # block Gram–Schmidt against the space so far keeps the columns from aligning
            step -= known @ (known.T @ step)
        blocks.append(torch.linalg.qr(step)[0])
    space = torch.linalg.qr(torch.cat(blocks, dim=1))[0]  # orthonormal even where a step added nothing new
    # Rayleigh–Ritz from the factor: spaceᵀ C space = (Lᵀ space)ᵀ (Lᵀ space) − δ I, as the space is orthonormal.
    lifted = factor.T @ space
    projected = lifted.T @ lifted
    projected.diagonal().sub_(shift)
    # The small eigh on the CPU: on a GPU it is launch-bound (about 11 ms for 160 × 160 on an H200).
    vectors = torch.linalg.eigh(projected.cpu())[1][:, :rank].to(space.device)
    return (space @ vectors).contiguous()


class TriangularSolves:
    """(L Lᵀ)⁻¹ · a few columns, for a lower Cholesky factor L (upper triangle zero), three ways:

    narrow: `cholesky_solve`. On a GPU its two triangular solves walk the diagonal 32 rows at a time, one
    dependent kernel after another: latency-bound (37 ms for 4 steps of 32 columns at 11,008 wide on an H100,
    where reading L takes 0.3 ms). blocked: L's diagonal blocks of `block` rows are inverted once (one batched
    solve), then each solve is d/block steps of two matrix products, reading L once. inverse: L⁻¹ formed whole
    (d³/3 more work), two products a step. The solver's 4 steps on an H100 (`solver_parts.py --inverse`,
    2026-12-08): narrow 11.4 / 35.6 / 118 ms at 4,096 / 11,008 / 28,672 wide, blocked 3.1 / 5.7 / 19 ms, inverse
    4.8 / 44 / 508 ms; the blocked results within 3e-14 of the narrow ones.
    """

    def __init__(self, factor: torch.Tensor, how: str = "blocked", block: int = 1024) -> None:
        if how not in ("narrow", "blocked", "inverse"):
            raise ValueError(f"triangular solves {how!r}: narrow, blocked or inverse")
        self.factor, self.how = factor, how
        d = factor.shape[0]
        self.bounds = [(start, min(start + block, d)) for start in range(0, d, block)]
        if how == "inverse":
            eye = torch.eye(d, dtype=factor.dtype, device=factor.device)
            self.inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
        elif how == "blocked":
            size = min(block, d)
            diagonal = torch.eye(size, dtype=factor.dtype, device=factor.device).repeat(len(self.bounds), 1, 1)
            for i, (start, stop) in enumerate(self.bounds):  # the last block padded with the identity
                diagonal[i, : stop - start, : stop - start] = factor[start:stop, start:stop]
            eye = torch.eye(size, dtype=factor.dtype, device=factor.device).expand_as(diagonal)
            self.diagonal_inverses = torch.linalg.solve_triangular(diagonal, eye, upper=False)

    def __call__(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.how == "narrow":
            return torch.cholesky_solve(rhs, self.factor)
        if self.how == "inverse":
            return self.inverse.T @ (self.inverse @ rhs)
        factor, inverses, d = self.factor, self.diagonal_inverses, self.factor.shape[0]
        forward = torch.empty_like(rhs)  # L⁻¹ rhs, block row by block row
        for i, (start, stop) in enumerate(self.bounds):
            part = rhs[start:stop]
            if start:
                part = torch.addmm(part, factor[start:stop, :start], forward[:start], alpha=-1)
            torch.mm(inverses[i, : stop - start, : stop - start], part, out=forward[start:stop])
        result = torch.empty_like(rhs)  # L⁻ᵀ of that, from the last block row up
        for i, (start, stop) in reversed(list(enumerate(self.bounds))):
            part = forward[start:stop]
            if stop < d:
                part = torch.addmm(part, factor[stop:, start:stop].T, result[stop:], alpha=-1)
            torch.mm(inverses[i, : stop - start, : stop - start].T, part, out=result[start:stop])
        return result


def largest_eigenvalue(covariance: torch.Tensor, generator: torch.Generator, steps: int = 8) -> float:
    """λ_max of a PSD matrix to within a small factor (power iteration): enough to scale a shift. One host
    sync, at the end."""
    vector = torch.randn(covariance.shape[0], 1, generator=generator, dtype=torch.float64).to(covariance.device)
    norm = vector.norm()
    for _ in range(steps):
        vector = (covariance @ (vector / norm.clamp_min(1e-300)).to(covariance.dtype)).double()
        norm = vector.norm()
    return float(norm)


def projected_factors(weight: torch.Tensor, basis: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Null's A (r, d_in) and B (d_out, r) with scaling · B A = W U Uᵀ, the weight on the null space.

    The SVD of the small (d_out, r) matrix W U gives the factorization; no (d_out, d_in) SVD is needed:
    W U = U' Σ' Q'ᵀ  ⇒  W U Uᵀ = U' Σ' (U Q')ᵀ.
    """
    d_out, rank = weight.shape[0], basis.shape[1]
    if rank > d_out:
        raise InvalidRankError(f"rank {rank} exceeds the layer's output width {d_out}; use a rank ≤ {d_out}.")
    basis = basis.to(torch.float64)
    projected = torch.cat([rows.to(torch.float64) @ basis for rows in row_chunks(weight)])
    left, singular, right_t = torch.linalg.svd(projected, full_matrices=False)
    root = singular.sqrt() / math.sqrt(scaling)
    lora_b = (left * root).contiguous()
    lora_a = (root.unsqueeze(1) * (right_t @ basis.T)).contiguous()
    return lora_a, lora_b


def row_chunks(matrix: torch.Tensor, bytes_per_chunk: int = 256 * 2**20) -> list[torch.Tensor]:
    """Views of `matrix` by rows, each small enough in float64 that a full float64 copy is never needed."""
    rows = max(1, bytes_per_chunk // (8 * matrix.shape[1]))
    return list(matrix.split(rows))


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
