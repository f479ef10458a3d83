"""Every file and folder name lora-null writes or reads as its own, defined once (PEFT's utils/constants.py)."""

# An init folder (`lora-null init`): the record, the residual base and the initial adapter.
METADATA_FILE = "lora_null.json"
BASE_DIR, ADAPTER_DIR = "base", "adapter"
# What the framework plugins write next to their own output.
INIT_DIR, EXPORT_DIR = "lora_null_init", "lora_null_export"
RESIDUAL_ADAPTER_DIR = "lora_null_residual_adapter"  # a finished v1 run's adapter as trained, on the residual base
# Provenance written into every export and merge: an export is never exported again.
EXPORT_MARKER, MERGE_MARKER = "lora_null_export.json", "lora_null_merge.json"
# The forgetting meter's reference (the original model's samples and their log-probabilities), beside lora_null_init/.
FORGETTING_REFERENCE = "lora_null_forgetting.safetensors"
# `inspect`'s numbers, beside its report.html.
INSPECT_FILE = "report.json"
# PEFT's adapter files.
WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
# Set in a residual base's config (config.json): the model is not an original, and must not be initialized again.
RESIDUAL_MARKER = "lora_null_residual"
# A folder holding one of these (or the demo's init/ folder) was written by lora-null: --overwrite may replace it.
OUTPUT_MARKERS = (METADATA_FILE, EXPORT_MARKER, MERGE_MARKER, INSPECT_FILE, f"init/{METADATA_FILE}")
