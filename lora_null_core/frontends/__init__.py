"""Who calls the core: the command line (cli, with jobs running `init` and inspection running `inspect`), the demo and
its toy world, and what the framework plugins share: their config keys (framework_config), the trainer lifecycle
(lifecycle) and the trainer callback (callback). A plugin imports from `lora_null_core` and from here, nothing else."""

from ..calibration.sources import load_rows
from ..layout import EXPORT_DIR, INIT_DIR
from .callback import LoraNullCallback
from .framework_config import (
    FRONT_END_KEYS,
    NESTED_KEY,
    PREFIX,
    config_fields,
    config_from_mapping,
    front_end_help,
    lora_null_request,
    prefixed_dataclass_fields,
    task_data_for,
)
from .lifecycle import finish_training, init_dir, initialize_for_training, training_callback
from .meter_callback import ForgettingCallback, attach_meters, meter_wanted

__all__ = [
    "EXPORT_DIR",
    "ForgettingCallback",
    "FRONT_END_KEYS",
    "INIT_DIR",
    "NESTED_KEY",
    "PREFIX",
    "LoraNullCallback",
    "attach_meters",
    "config_fields",
    "config_from_mapping",
    "finish_training",
    "front_end_help",
    "init_dir",
    "initialize_for_training",
    "load_rows",
    "lora_null_request",
    "meter_wanted",
    "prefixed_dataclass_fields",
    "task_data_for",
    "training_callback",
]
