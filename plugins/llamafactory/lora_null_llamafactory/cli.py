"""`lora-null-llamafactory train cfg.yaml [key=value …]`: LLaMA-Factory's training with the LoRA-Null keys."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = "usage: lora-null-llamafactory train CONFIG.yaml [key=value ...]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "train":
        print(USAGE, file=sys.stderr)
        return 2
    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp

    from .patches import LoraNullCallback, export_final, install, set_dataset_dir

    install()
    sys.argv = [sys.argv[0], *argv[1:]]  # read_args takes the YAML and overrides from sys.argv, as llamafactory-cli
    args = read_args()
    if isinstance(args, dict):
        set_dataset_dir(args.get("dataset_dir", "data"))
    run_exp(args, callbacks=[LoraNullCallback()])
    if isinstance(args, dict) and args.get("adapter_init") == "lora_null":
        export_final(args["output_dir"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
