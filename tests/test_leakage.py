import math

import torch

from lora_null_core.calibration import leakage
from lora_null_core.calibration.leakage import leakage_from_covariance, leakages_from_covariance, random_like


def test_leakages_on_one_covariance_match_the_definition(monkeypatch):
    """Several A in one pass over C, by row chunks, give ‖A X‖_F / (‖A‖_F ‖X‖_F / √d) for each."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)
    covariance = (x.T @ x).float()
    matrices = [torch.randn(4, 40, generator=g), torch.randn(2, 40, generator=g, dtype=torch.float64)]
    chunks = leakage.row_chunks
    monkeypatch.setattr(leakage, "row_chunks", lambda m: chunks(m, bytes_per_chunk=8 * 40 * 7))  # chunks of 7 rows
    got = leakages_from_covariance(matrices, covariance)
    xs = x.float().double()
    for a, value in zip(matrices, got, strict=True):
        a = a.double()
        expected = (xs @ a.T).norm() / (a.norm() * xs.norm() / math.sqrt(40))
        assert math.isclose(value, float(expected), rel_tol=1e-5)
    assert leakage_from_covariance(matrices[0], covariance) == got[0]


def test_random_baseline_has_the_norm_of_a_and_is_reproducible():
    a = torch.randn(4, 30, dtype=torch.float64) * 3
    first, second = random_like(a, seed=1), random_like(a, seed=1)
    assert torch.equal(first, second) and math.isclose(float(first.norm()), float(a.norm()), rel_tol=1e-12)
