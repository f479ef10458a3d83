"""Accuracy and extra memory of accumulating covariance sums in place (`add_gram_`) against `m += xᵀx`.

    python benchmarks/speed/check_gram.py     # on a GPU: bf16 input, fp32 sums, a 7B down_proj's width

Both add the same 8192 × 11008 input twice and are compared with a float64 reference. On a CPU both take
the same (upcasting) path, so the comparison only means something on a GPU.
"""

import torch

from lora_null_core.calibrate import add_gram_, gram


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(8192, 11008, device=device).to(torch.bfloat16 if device == "cuda" else torch.float32)
    reference = 2 * (x.double().T @ x.double())
    for name, add in (("add_gram_", lambda m: add_gram_(m, x)), ("m += gram", lambda m: m.add_(gram(x, torch.float32)))):
        matrix = torch.zeros(11008, 11008, device=device)
        extra = "n/a on CPU"
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        add(matrix)
        add(matrix)
        if device == "cuda":
            torch.cuda.synchronize()
            extra = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB"
        error = float((matrix.double() - reference).norm() / reference.norm())
        print(f"{name}: relative error {error:.2e}, extra peak {extra}")


if __name__ == "__main__":
    main()
