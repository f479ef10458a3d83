"""Accuracy, time and extra memory of summing covariances in place (`add_gram_`), whole or by panels (only on
and right of the diagonal blocks, then mirrored), against `m += xᵀx`.

    python benchmarks/speed/check_gram.py     # on a GPU: bf16 input, fp32 sums, a 7B's and a 70B's widths

Each way adds the same 8192-token input twice and is compared with a float64 reference (on a CPU all ways
take the upcasting path, so the comparison only means something on a GPU).
"""

import time

import torch

from lora_null_core.calibration.covariances import add_gram_, gram_panels, mirror_panels_


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx as a new fp32 matrix (a d×d temporary): on a GPU, bf16 inputs with fp32 accumulation."""
    if x.is_cuda:
        return torch.mm(x.T, x, out_dtype=torch.float32)
    return x.T.float() @ x.float()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("| width | way | ms per add | relative error | extra peak MiB |\n| ---: | --- | ---: | ---: | ---: |")
    for width in (4096, 11008, 28672):
        x = torch.randn(8192, width, device=device).to(torch.bfloat16 if device == "cuda" else torch.float32)
        reference = 2 * (x.double().T @ x.double())
        panels = gram_panels(width)
        ways = {
            "m += gram": lambda m, x=x: m.add_(gram(x)),
            "add_gram_, whole": lambda m, x=x: add_gram_(m, x),
            f"add_gram_, {len(panels)} panels": lambda m, x=x, panels=panels: add_gram_(m, x, panels),
        }
        for name, add in ways.items():
            matrix = torch.zeros(width, width, device=device)
            add(matrix)  # warm-up
            matrix.zero_()
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device == "cuda" else 0
            start = time.perf_counter()
            add(matrix)
            add(matrix)
            sync()
            seconds = (time.perf_counter() - start) / 2
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
            if "panels" in name:
                mirror_panels_(matrix, panels)
            error = float((matrix.double() - reference).norm() / reference.norm())
            print(f"| {width} | {name} | {seconds * 1e3:.1f} | {error:.2e} | {extra:.0f} |", flush=True)
            del matrix
        del x, reference
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
