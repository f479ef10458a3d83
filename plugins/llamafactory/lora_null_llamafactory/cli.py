"""`lora-null-llamafactory train cfg.yaml [key=value …]` and `… webui`: LLaMA-Factory with the LoRA-Null keys."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

USAGE = "usage: lora-null-llamafactory train CONFIG.yaml [key=value ...]  |  lora-null-llamafactory webui"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["webui"]:
        from .webui import run

        run()
        return 0
    if len(argv) < 2 or argv[0] != "train":
        print(USAGE, file=sys.stderr)
        return 2
    if _wants_torchrun():
        return _relaunch_with_torchrun(argv)
    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp

    from .patches import LoraNullCallback, export_final, forgetting_meter, install, set_dataset_dir

    install()
    sys.argv = [sys.argv[0], *argv[1:]]  # read_args takes the YAML and overrides from sys.argv, as llamafactory-cli
    args = read_args()
    callbacks = [LoraNullCallback()]
    if isinstance(args, dict):
        set_dataset_dir(args.get("dataset_dir", "data"))
        meter = forgetting_meter(args)
        callbacks += [meter] if meter is not None else []
    run_exp(args, callbacks=callbacks)
    if isinstance(args, dict) and args.get("adapter_init") == "lora_null":
        export_final(args["output_dir"])
    return 0


def _wants_torchrun() -> bool:
    """llamafactory-cli's rule: several devices (or FORCE_TORCHRUN) and not already a torchrun worker."""
    if "LOCAL_RANK" in os.environ:
        return False
    from llamafactory.extras.misc import get_device_count, is_env_enabled

    return is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1


def _relaunch_with_torchrun(argv: list[str]) -> int:
    """Start the workers the way llamafactory-cli does, but on this launcher, so every worker is patched."""
    from llamafactory.extras.misc import find_available_port, get_device_count

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        os.getenv("NNODES", "1"),
        "--node_rank",
        os.getenv("NODE_RANK", "0"),
        "--nproc_per_node",
        os.getenv("NPROC_PER_NODE", str(max(get_device_count(), 1))),
        "--master_addr",
        os.getenv("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        os.getenv("MASTER_PORT", str(find_available_port())),
        "-m",
        "lora_null_llamafactory.cli",
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
