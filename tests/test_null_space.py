import math

import pytest
import torch

from lora_null_core import null_space
from lora_null_core.errors import InvalidRankError
from lora_null_core.null_space import basis_factors, effective_rank, null_basis, projected_factors, row_chunks


def random_covariance(d=24, rank=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, d, generator=g, dtype=torch.float64
    )
    return x.T @ x + 1e-3 * torch.eye(d, dtype=torch.float64)


def test_null_basis_spans_the_smallest_eigenvectors():
    cov = random_covariance()
    basis = null_basis(cov, 4)
    values, vectors = torch.linalg.eigh(cov)
    expected = vectors[:, :4]
    assert torch.allclose(basis.T @ basis, torch.eye(4, dtype=torch.float64), atol=1e-10)
    # Same subspace: projecting onto one loses nothing of the other.
    assert torch.linalg.norm(expected - basis @ (basis.T @ expected)) < 1e-8
    # And its energy is the minimum any 4-dim subspace can have.
    assert torch.trace(basis.T @ cov @ basis) == pytest.approx(float(values[:4].sum()), rel=1e-8)


@pytest.mark.parametrize("scaling", [1.0, 2.0, 16 / math.sqrt(8)])
def test_projected_factors_rebuild_the_projected_weight(scaling):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(20, 24, generator=g, dtype=torch.float64)
    basis = null_basis(random_covariance(), 6)
    lora_a, lora_b = projected_factors(weight, basis, scaling)
    assert lora_a.shape == (6, 24) and lora_b.shape == (20, 6)
    assert torch.allclose(scaling * lora_b @ lora_a, weight @ basis @ basis.T, atol=1e-10)
    # A's rows lie in the null basis' span.
    assert torch.allclose(lora_a @ basis @ basis.T, lora_a, atol=1e-10)
    # Balanced factors (PiSSA-style): B and A carry equal singular values.
    assert torch.allclose(lora_b.norm(dim=0), lora_a.norm(dim=1), atol=1e-10)


def test_basis_factors_are_the_basis_and_zero():
    basis = null_basis(random_covariance(), 5)
    lora_a, lora_b = basis_factors(basis, 7)
    assert torch.equal(lora_a, basis.T) and lora_b.shape == (7, 5) and not lora_b.any()


def test_rank_must_leave_a_null_space():
    with pytest.raises(InvalidRankError, match="d_in - 1 = 23"):
        null_basis(random_covariance(), 24)
    with pytest.raises(InvalidRankError, match="output width 3"):
        projected_factors(torch.randn(3, 24, dtype=torch.float64), null_basis(random_covariance(), 4), 1.0)


def test_effective_rank_matches_hand_computed_values():
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    # p = (3/4, 1/4): exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7548…
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(1.7547654, rel=1e-6)
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(1.7547654, rel=1e-6)


@pytest.mark.parametrize("solver", ["eigh32", "subspace"])
def test_fast_solvers_reach_the_exact_bottom_energy(solver, monkeypatch):
    # Low rank plus a noise floor: the shape of real activation covariances.
    cov = random_covariance(d=256, rank=120, seed=2) + 1e-2 * torch.eye(256, dtype=torch.float64)
    exact = null_basis(cov, 8, "eigh64")
    monkeypatch.setattr(null_space, "eigendecompose", None)  # the fast path itself, no exact fallback
    fast = null_basis(cov, 8, solver)
    assert torch.allclose(fast.T @ fast, torch.eye(8, dtype=torch.float64), atol=1e-5)
    energy = lambda b: float(torch.trace(b.T @ cov @ b))  # noqa: E731
    assert energy(fast) <= 1.1 * energy(exact)


@pytest.mark.parametrize("how", ["blocked", "inverse"])
@pytest.mark.parametrize("block", [64, 1024])
def test_triangular_solves_agree_with_cholesky_solve(how, block):
    # 300 rows: blocks of 64 leave a partial last block (padded with the identity); 1024 is one block.
    x = torch.randn(900, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x * torch.logspace(0, -3, 300, dtype=torch.float64)  # three decades, as activations span
    factor = torch.linalg.cholesky(x.T @ x)
    rhs = torch.randn(300, 20, dtype=torch.float64)
    expected = torch.cholesky_solve(rhs, factor)
    solved = null_space.TriangularSolves(factor, how, block)(rhs)
    assert float((solved - expected).abs().max() / expected.abs().max()) < 1e-12


@pytest.mark.parametrize("solves", ["blocked", "inverse"])
def test_subspace_through_other_triangular_solves_finds_the_same_space(solves):
    # On a GPU the steps go through L's inverted diagonal blocks (blocked); they must give the narrow solves'
    # Krylov space.
    covariance, used_basis = float32_rank_deficient_covariance()
    solved, other = (null_space.subspace_null_basis(covariance, 16, solves=how) for how in ("narrow", solves))
    assert torch.allclose(other.T @ other, torch.eye(16, dtype=torch.float64), atol=1e-8)
    assert torch.linalg.norm(solved - other @ (other.T @ solved)) < 1e-6  # one span
    assert float((used_basis.T @ other).norm()) < 0.1


def test_triangular_solves_refuse_an_unknown_way():
    with pytest.raises(ValueError, match="narrow, blocked or inverse"):
        null_space.TriangularSolves(torch.eye(3, dtype=torch.float64), "qr")


@pytest.mark.parametrize("solver", ["eigh64", "eigh32", "subspace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solvers_leave_the_callers_covariance_untouched(solver, dtype):
    # The subspace solver factorizes in place: it must do so on its own copy, even when no cast is needed.
    cov = random_covariance(d=200, rank=120, seed=3).to(dtype)  # wide enough for the Krylov space
    before = cov.clone()
    null_basis(cov, 4, solver)
    assert torch.equal(cov, before)


def test_row_chunks_cover_the_matrix_in_order():
    matrix = torch.arange(60.0).reshape(12, 5)
    chunks = row_chunks(matrix, bytes_per_chunk=8 * 5 * 5)  # five rows of float64 per chunk
    assert [c.shape[0] for c in chunks] == [5, 5, 2]
    assert torch.equal(torch.cat(chunks), matrix)
    chunks[1].zero_()  # views: writing a chunk writes the matrix
    assert not matrix[5:10].any()


def float32_rank_deficient_covariance(d=512, used=490, tokens=3000, seed=0):
    """Σ xᵀx summed in float32 over activations that use only `used` of `d` directions, spanning three decades:
    rounding makes its null directions slightly negative, as on real down_proj inputs (SmolLM2: ~50 eigenvalues
    near −1e-9·λ_max). Returns the float32 sum and the exact orthonormal basis of the used directions."""
    g = torch.Generator().manual_seed(seed)
    used_basis = torch.linalg.qr(torch.randn(d, used, generator=g, dtype=torch.float64))[0]
    scales = torch.logspace(0, 3, used, dtype=torch.float64)
    x = ((torch.randn(tokens, used, generator=g, dtype=torch.float64) * scales) @ used_basis.T).float()
    covariance = torch.zeros(d, d)
    for chunk in x.split(64):
        covariance += chunk.T @ chunk
    return covariance, used_basis


@pytest.mark.parametrize("solver", ["eigh64", "eigh32", "subspace"])
def test_solvers_survive_a_slightly_indefinite_rank_deficient_covariance(solver):
    covariance, used_basis = float32_rank_deficient_covariance()
    assert torch.linalg.eigvalsh(covariance.double())[0] < 0  # the case that broke the subspace solver
    basis = null_basis(covariance, 16, solver)
    assert torch.allclose(basis.T @ basis, torch.eye(16, dtype=torch.float64), atol=1e-5)
    if solver != "eigh32":  # float32 eigh cannot separate eigenvalues 1e-6·λ_max apart from zero; it only must not fail
        # The basis lies in the directions the activations never use, as closely as eigh64 on the same float32 sum
        # can find them (its rounding tilts the null space by a few percent).
        exact = null_basis(covariance, 16, "eigh64")
        assert float((used_basis.T @ basis).norm()) <= 1.1 * float((used_basis.T @ exact).norm()) + 1e-6 < 0.1


def test_subspace_falls_back_to_eigh_when_cholesky_keeps_failing():
    covariance = random_covariance(d=32, rank=20)
    covariance[0, 0] = -covariance.diagonal().sum()  # far more indefinite than rounding could make it
    basis = null_basis(covariance, 4, "subspace")
    expected = torch.linalg.eigh(covariance)[1][:, :4]
    assert torch.linalg.norm(expected - basis @ (basis.T @ expected)) < 1e-8
