"""Loading models and writing results: atomically, safetensors only, in HF's folder layouts.

An init folder holds `base/` (the residual base model, with the tokenizer), `adapter/` (the PEFT adapter
that, on that base, computes the original function) and `lora_null.json` (what was done, and measured).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from peft import PeftModel
from safetensors import SafetensorError

from ..atomic import StrPath, atomic_output_dir
from ..console import quiet_libraries
from ..errors import LoraNullError
from ..init.peft_layers import apply_variant
from ..layout import ADAPTER_DIR, BASE_DIR, CONFIG_FILE, WEIGHTS_FILE
from ..peft_names import base_name, is_adapter_parameter
from ..report import file_sha256, read_metadata

logger = logging.getLogger(__name__)

DTYPE_KEY = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


FLOAT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    if name == "auto":
        return "auto"
    if name not in FLOAT_DTYPES:
        raise LoraNullError(f"--dtype {name!r} is not a floating-point dtype; use {', '.join(FLOAT_DTYPES)}.")
    return getattr(torch, name)


def check_model_source(name_or_path: str) -> None:
    """A path that looks local must exist: a missing folder is a typo, not a hub repo id."""
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise LoraNullError(f"Model folder {name_or_path} does not exist; check the path (--model).")
    if path.is_dir() and not (path / "config.json").is_file():
        raise LoraNullError(f"{name_or_path} holds no config.json, so it is not a transformers model folder (--model).")
    if path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise LoraNullError(
            f"{name_or_path} holds only pickled weights (*.bin), which lora-null does not load (a pickle can run "
            "code). Convert it to safetensors first, e.g. model.save_pretrained(folder) after loading it yourself."
        )


def load_model(name_or_path: str, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
    """A causal LM from a local folder or hub name, from safetensors only; remote code runs only when asked for."""
    from transformers import AutoModelForCausalLM

    check_model_source(name_or_path)
    kwargs = {DTYPE_KEY: torch_dtype(dtype), "trust_remote_code": trust_remote_code, "use_safetensors": True}
    try:
        with quiet_libraries():
            model: Any = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise LoraNullError(f"Could not load model {name_or_path!r}: {loading_hint(err)}") from err
    return model.to(device) if device else model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_source(name_or_path)
    try:
        with quiet_libraries():
            return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise LoraNullError(f"Could not load the tokenizer of {name_or_path!r}: {loading_hint(err)}") from err


def loading_hint(err: Exception) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "trust_remote_code" in str(err):
        return (
            "the model's repository ships its own code, which runs only if you trust it: pass "
            "--trust-remote-code (trust_remote_code=True in Python)."
        )
    if "safetensors" in str(err).lower() or "header" in str(err).lower() or "incomplete" in str(err).lower():
        return f"{message} (a truncated or damaged safetensors file? Download or save the model again)."
    return message


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's weights as plain transformers keys: LoRA tensors dropped, `.base_layer` unwrapped."""
    state = {}
    for key, tensor in peft_model.get_base_model().state_dict().items():
        if not is_adapter_parameter(key):
            state[base_name(key)] = tensor
    return state


def save_initialized(
    peft_model: PeftModel, output_dir: StrPath, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write base/, adapter/ and lora_null.json of an initialized model into `output_dir`, atomically."""
    with atomic_output_dir(output_dir, overwrite) as staging, quiet_libraries():
        write_initial_adapter(peft_model, staging, Path(output_dir).resolve() / BASE_DIR)
        base: Any = peft_model.get_base_model()  # a transformers model
        logger.info(
            "Writing the %sbase model to %s.",
            "residual " if peft_model.lora_null_report.train_base == "residual" else "",
            Path(output_dir) / BASE_DIR,
        )
        base.save_pretrained(staging / BASE_DIR, state_dict=base_state_dict(peft_model))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / BASE_DIR)
    logger.info("Wrote %s (base/, adapter/, lora_null.json).", output_dir)
    return Path(output_dir)


def save_initial_adapter(peft_model: PeftModel, output_dir: StrPath, overwrite: bool = False) -> Path:
    """Write only adapter/ and lora_null.json: all `export` needs, when the base can be rebuilt by
    re-running the (deterministic) init, as a trainer resuming from a checkpoint does."""
    with atomic_output_dir(output_dir, overwrite) as staging:
        write_initial_adapter(peft_model, staging)
    return Path(output_dir)


def write_initial_adapter(peft_model: PeftModel, folder: Path, base_path: StrPath | None = None) -> None:
    """adapter/ and lora_null.json. The adapter runs on the residual base, never on the original model, so its
    config names `base_path` (OUT/base) or, where no base is written, says where one comes from: a tool that
    loads the base named there cannot pick the original by mistake."""
    report = getattr(peft_model, "lora_null_report", None)
    if report is None:
        raise LoraNullError("This PeftModel was not initialized by lora_null_init (it has no lora_null_report).")
    save_adapter(peft_model, folder / ADAPTER_DIR, report.adapter_name)
    if report.train_base == "residual":
        name_base(
            folder / ADAPTER_DIR,
            str(base_path)
            if base_path
            else f"lora-null residual base of {report.model or 'the original model'} (not saved: rebuild it with "
            "`lora-null init`, or load this folder with load_initialized)",
        )
    report.adapter_sha256 = file_sha256(folder / ADAPTER_DIR / WEIGHTS_FILE)
    report.write(folder)


def name_base(adapter_dir: Path, base: str) -> None:
    """Set base_model_name_or_path in a PEFT adapter folder's adapter_config.json."""
    config_path = Path(adapter_dir) / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(peft_model: PeftModel, folder: Path, adapter_name: str) -> None:
    """PEFT adapter folder for one adapter, always at `folder` itself (PEFT nests non-default names)."""
    with quiet_libraries():
        peft_model.save_pretrained(str(folder), selected_adapters=[adapter_name])
    nested = folder / adapter_name
    if adapter_name != "default" and nested.is_dir():
        for item in nested.iterdir():
            item.rename(folder / item.name)
        nested.rmdir()


def load_initialized(
    init_dir: StrPath,
    adapter: StrPath | None = None,
    dtype: str = "auto",
    device: str | None = None,
    is_trainable: bool = True,
) -> PeftModel:
    """The residual base with the LoRA-Null adapter (or a later checkpoint of it), ready to train.

    For v2 lora_A comes back frozen, which PEFT's own loader cannot know.
    """
    init_dir = Path(init_dir)
    metadata = read_metadata(init_dir)
    model = load_model(str(init_dir / BASE_DIR), dtype=dtype, device=device)
    adapter_path = str(adapter or init_dir / ADAPTER_DIR)
    with quiet_libraries():
        peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable)
    if is_trainable:
        apply_variant(peft_model, metadata["variant"], "default")
    return peft_model
