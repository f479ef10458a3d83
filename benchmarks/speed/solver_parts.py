"""Where a null-space solve's time goes on a GPU: the float64 Cholesky, 12 narrow `cholesky_solve`s (32
right-hand sides, what the earlier 12-step subspace iteration ran), 12 QRs of that block, and the whole
`subspace_null_basis` of the checked-out code.

    python benchmarks/speed/solver_parts.py 4096 11008 28672
    python benchmarks/speed/solver_parts.py --batched 3 4096   # a block's three 4,096-wide covariances at once
    python benchmarks/speed/solver_parts.py --inverse 4096 11008 28672   # the ways of TriangularSolves

The covariances are synthetic (random tokens with a spectrum over three decades): the times depend on the width,
not on the values. Run it at an older commit (PYTHONPATH=<checkout>) for that commit's whole-solver time.
"""

import json
import sys
import time

import torch

from lora_null_core.null_space import TriangularSolves, subspace_null_basis


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def covariance(d: int, tokens: int = 24576) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, d, device="cuda", generator=g) * torch.logspace(0, -3, d, device="cuda")
    x = (x @ torch.linalg.qr(torch.randn(d, d, device="cuda", generator=g))[0]).bfloat16().float()
    return torch.zeros(d, d, device="cuda").addmm_(x.T, x)


def parts(d: int, rank: int = 16, steps: int = 12) -> tuple[float, float, float, float]:
    """Seconds of (Cholesky, `steps` solves, `steps` QRs, the whole solver) at width d."""
    c = covariance(d)
    subspace_null_basis(c, rank)  # warm-up: kernels and workspaces
    whole = timed(lambda: subspace_null_basis(c, rank))
    factor = c.double()
    factor.diagonal().add_(1e-6 * float(factor.diagonal().max()))
    cholesky = timed(lambda: torch.linalg.cholesky(factor, out=factor))
    block = torch.randn(d, rank + 16, dtype=torch.float64, device="cuda")
    solves = timed(lambda: [torch.cholesky_solve(block, factor) for _ in range(steps)])
    qrs = timed(lambda: [torch.linalg.qr(block) for _ in range(steps)])
    return cholesky, solves, qrs, whole


def batched(d: int, count: int, rank: int = 16, steps: int = 4) -> tuple[float, float]:
    """Seconds of the block Krylov solver's GPU work (Cholesky, `steps` solves, `steps` + 1 QRs) for `count`
    same-width covariances, one after another and as one batch: whether a block's covariances of one width (a
    Llama's attention, output and MLP inputs: three of 4,096) should be solved together. On an H100 (2026-12-07)
    they should not: 43.7 ms one by one, 43.3 ms batched."""
    shifted = torch.stack([covariance(d) for _ in range(count)]).double()
    shifted.diagonal(dim1=-2, dim2=-1).add_(1e-6 * float(shifted.diagonal(dim1=-2, dim2=-1).max()))
    start = torch.randn(count, d, rank + 16, dtype=torch.float64, device="cuda")

    def krylov(matrices: torch.Tensor, block: torch.Tensor) -> None:
        factor = torch.linalg.cholesky(matrices)
        block = torch.linalg.qr(block)[0]
        for _ in range(steps):
            block = torch.linalg.qr(torch.cholesky_solve(block, factor))[0]

    def one_by_one() -> None:
        for i in range(count):
            krylov(shifted[i], start[i])

    one_by_one(), krylov(shifted, start)  # warm-up
    return timed(one_by_one), timed(lambda: krylov(shifted, start))


def through_inverse(d: int, rank: int = 16, steps: int = 4) -> dict[str, float]:
    """Milliseconds of the block Krylov solver's `steps` solves each way of `TriangularSolves` (narrow
    `cholesky_solve`s, L's inverted diagonal blocks, L⁻¹ whole), setup included; of the whole solver each way; the
    largest relative gap of the other ways' solves to the narrow ones; and, up to 11,008 wide, each way's
    bottom-`rank` energy over eigh64's (1.0 is exact)."""
    c = covariance(d)
    factor = c.double()
    factor.diagonal().add_(1e-6 * float(factor.diagonal().max()))
    torch.linalg.cholesky(factor, out=factor)
    block = torch.randn(d, rank + 16, dtype=torch.float64, device="cuda")
    ways = ("narrow", "blocked", "inverse")

    def solved(how: str) -> torch.Tensor:
        solve, out = TriangularSolves(factor, how), block
        for _ in range(steps):
            out = solve(out)
        return out

    reference = {how: solved(how) for how in ways}  # also the warm-up
    gap = max(
        float((reference[how] - reference["narrow"]).abs().max() / reference["narrow"].abs().max()) for how in ways
    )
    row = {f"{how}_ms": timed(lambda h=how: solved(h)) for how in ways}
    for how in ways:
        subspace_null_basis(c, rank, solves=how)  # warm-up
        row[f"whole_{how}_ms"] = timed(lambda h=how: subspace_null_basis(c, rank, solves=h))
    row = {k: v * 1e3 for k, v in row.items()}
    row["solve_gap"] = gap
    if d <= 11008:
        exact = float(torch.linalg.eigvalsh(c.double())[:rank].sum())
        for how in ways:
            basis = subspace_null_basis(c, rank, solves=how).to(c.dtype)
            row[f"energy_{how}"] = float(torch.trace(basis.T @ c @ basis)) / exact
    return row


def main(widths: list[int]) -> None:
    print(
        "| width | Cholesky (float64) | 12 × cholesky_solve | 12 × QR | whole solver |\n"
        "| ---: | ---: | ---: | ---: | ---: |"
    )
    for d in widths:
        cholesky, solves, qrs, whole = parts(d)
        print(
            f"| {d} | {cholesky * 1e3:.1f} ms | {solves * 1e3:.1f} ms | {qrs * 1e3:.1f} ms | {whole * 1e3:.0f} ms |",
            flush=True,
        )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--batched"]:
        count, *widths = (int(w) for w in sys.argv[2:])
        for d in widths or [4096]:
            apart, together = batched(d, count)
            print(f"{count} × {d}: one by one {apart * 1e3:.1f} ms, batched {together * 1e3:.1f} ms", flush=True)
    elif sys.argv[1:2] == ["--inverse"]:
        for d in [int(w) for w in sys.argv[2:]] or [4096, 11008]:
            print(json.dumps({"width": d, "device": torch.cuda.get_device_name(), **through_inverse(d)}), flush=True)
            torch.cuda.empty_cache()
    else:
        main([int(w) for w in sys.argv[1:]] or [4096, 11008, 28672])
