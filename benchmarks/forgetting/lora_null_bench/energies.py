"""Where an init's lora_A points: its energy on knowledge inputs and on task inputs, right after init.

energy = leakage² = ‖A X‖² / (‖A‖² ‖X‖² / d_in): the share of an average direction's energy that A's rows pick
up (a random A scores about 1). A frozen A with little knowledge energy cannot move what the model knows; one
with much task energy has room to learn the task. Measured per layer with the core's leakage collector.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from peft import PeftModel

from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.calibration.leakage import LeakageCollector
from lora_null_core.calibration.taps import run_activation_pass
from lora_null_core.init.peft_layers import lora_layers

PROBE_TEXTS = 256  # of each kind: enough tokens for every input width of these models


def energies(
    peft_model: PeftModel, tokenizer: Any, texts_by_kind: Mapping[str, Sequence[str]], max_length: int = 128
) -> dict[str, Any]:
    """Mean energy of lora_A over layers on each kind of text ("knowledge", "task"), overall and per layer type."""
    layers = lora_layers(peft_model, "default")
    lora_as = {name: layer.lora_A["default"].weight.detach() for name, layer in layers.items()}
    out: dict[str, Any] = {}
    for kind, texts in texts_by_kind.items():
        collector = LeakageCollector(lora_as, seed=0)
        batches = tokenize_batches(list(texts)[:PROBE_TEXTS], tokenizer, max_length, batch_tokens=16384)
        run_activation_pass(peft_model, layers, batches, collector, desc=f"{kind} energy")
        per_layer = {name: leak**2 for name, (leak, _) in collector.results().items()}
        by_type: dict[str, list[float]] = {}
        for name, value in per_layer.items():
            by_type.setdefault(name.rsplit(".", 1)[-1], []).append(value)
        out[f"energy_{kind}"] = statistics.fmean(per_layer.values())
        out[f"energy_{kind}_by_type"] = {t: statistics.fmean(v) for t, v in sorted(by_type.items())}
    return out
