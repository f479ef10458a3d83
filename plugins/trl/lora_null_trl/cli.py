"""`lora-null-trl sft --config cfg.yaml`: TRL's own `sft` script with LoRA-Null's keys added.

The YAML is a TRL SFT config (model_name_or_path, dataset_name, use_peft, lora_r, …) plus `adapter_init:
lora_null` and `lora_null_*`. TRL's script runs unchanged except that it builds LoraNullSFTTrainer.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence

from lora_null_core import LoraNullError

from .config import LoraNullSFTConfig
from .trainer import LoraNullSFTTrainer


def _trl_sft_script():
    import trl
    from trl.scripts import sft

    if not hasattr(sft, "main"):
        raise SystemExit(f"lora-null-trl: trl {trl.__version__} has no scripts/sft.py main(); use trl>=0.24.")
    return sft


def _use_lora_null_trainer(sft) -> None:
    """The one change to TRL's script: the trainer class it builds. trl < 1.0 imports SFTTrainer at module
    level in scripts/sft.py; later versions import it from `trl` inside main()."""
    import trl

    trl.SFTTrainer = LoraNullSFTTrainer
    if hasattr(sft, "SFTTrainer"):
        sft.SFTTrainer = LoraNullSFTTrainer


def _check_lora_null_keys(argv: list[str]) -> None:
    """The YAML's lora_null_* keys, checked before TRL's parser sees them: a misspelled one would end in its
    traceback ("not used by the HfArgumentParser"); the core names the closest valid key instead."""
    import yaml

    from lora_null_core.frontends import NESTED_KEY, PREFIX, config_from_mapping

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            continue  # TRL's parser reports a missing or broken file itself
        if isinstance(values, dict):
            config_from_mapping(
                {k: v for k, v in values.items() if isinstance(k, str) and (k.startswith(PREFIX) or k == NESTED_KEY)}
            )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "sft":
        print("usage: lora-null-trl sft --config cfg.yaml [TRL sft arguments]", file=sys.stderr)
        return 2
    from trl import ModelConfig, ScriptArguments, TrlParser

    sft = _trl_sft_script()
    types = [ScriptArguments, LoraNullSFTConfig, ModelConfig]
    if len(inspect.signature(sft.main).parameters) == 4:  # trl >= 0.24 adds dataset mixtures
        from trl import DatasetMixtureConfig

        types.append(DatasetMixtureConfig)
    try:
        _check_lora_null_keys(argv[1:])
        parsed = TrlParser(types).parse_args_and_config(args=argv[1:])
        _use_lora_null_trainer(sft)
        sft.main(*parsed)
    except LoraNullError as err:
        print(f"lora-null-trl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
