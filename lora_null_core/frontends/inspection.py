"""`lora-null inspect`: what the null space looks like for a model and a calibration set, as a report.

Per layer: entropy effective rank of the input activations (singular values √λ of the covariance) against
that of the weight — the paper's evidence that activations leave a large, clean null space — and their
spectra. Given an init folder, also the leakage of its lora_A on these activations, against a random A of the
same norm and against the best any r-dim basis can do. Reuses the core's calibration pass.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..atomic import StrPath, atomic_output_dir
from ..calibration.batches import tokenize_batches
from ..calibration.covariances import collect_covariances
from ..calibration.leakage import leakages_from_covariance, random_like
from ..calibration.selection import select_calibration
from ..calibration.sources import CalibrationSource
from ..calibration.texts import choose_texts
from ..config import LoraNullConfig
from ..errors import LoraNullError
from ..init.peft_layers import output_layer
from ..layout import ADAPTER_DIR, INSPECT_FILE, WEIGHTS_FILE
from ..model_parts import model_device
from ..null_space import effective_rank, eigendecompose
from ..report import read_metadata, recorded_a_scale
from ..weights import weight_of


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer but the output head: what `target_modules="all-linear"` targets."""
    head = output_layer(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head}


def analyze(
    model: nn.Module,
    tokenizer: Any,
    calibration: CalibrationSource | None,
    config: LoraNullConfig | None = None,
    init_dir: StrPath | None = None,
    task_data: CalibrationSource | None = None,
) -> dict[str, Any]:
    """Every number of the report, per layer, as plain JSON-able data. No calibration: the model's own text.
    task_data (with init_dir): also the leakage of lora_A on the fine-tuning inputs, where A should have room."""
    config = (config or LoraNullConfig()).replace(holdout_samples=0)
    modules = linear_layers(model)
    widest = max(_input_width(module) for module in modules.values())
    chosen = select_calibration(model, calibration, tokenizer, config, model_device(model), widest)  # as init tops up
    texts = chosen.texts
    batches = tokenize_batches(texts.calibration, tokenizer, config.max_length, config.batch_size, config.batch_tokens)
    covariances = collect_covariances(model, modules, batches, torch.float64, config.covariance_weighting)
    adapter, rank, settings = _initial_adapter(init_dir)
    task = None
    if task_data is not None and adapter is not None:
        task_texts = choose_texts(task_data, tokenizer, config.num_samples, 0, config.seed, config.text_field)
        task_batches = tokenize_batches(
            task_texts.calibration, tokenizer, config.max_length, config.batch_size, config.batch_tokens
        )
        task = collect_covariances(model, modules, task_batches, torch.float64, config.covariance_weighting)
    eigen = {group: eigendecompose(matrix) for group, matrix in covariances.matrices.items()}  # ascending
    spectra = {group: values.clamp_min(0).flip(0).tolist() for group, (values, _) in eigen.items()}
    layers = []
    for name, module in modules.items():
        group = covariances.group_of[name]
        values = torch.tensor(spectra[group], dtype=torch.float64)
        weight = weight_of(module).detach().double()
        weight = weight.T if isinstance(module, Conv1D) else weight
        singular = torch.linalg.svdvals(weight)
        d_in, tokens = weight.shape[1], covariances.tokens[group]
        entry = {
            "name": name,
            "type": name.rsplit(".", 1)[-1],
            "depth": _depth(name),
            "d_in": d_in,
            "tokens": tokens,
            "covariance": group,
            "effective_rank_activations": effective_rank(values.sqrt()),
            "effective_rank_weight": effective_rank(singular),
            "numerical_rank_activations": int((values > 1e-10 * values[0]).sum()),
            "weight_spectrum": singular.tolist(),
        }
        if tokens < d_in:
            entry["recommendation"] = (
                f"{tokens} calibration tokens for input width {d_in}: the covariance cannot have full rank, so "
                f"its null space is partly chosen by rounding. Use at least {d_in} tokens (more samples or "
                "longer ones)."
            )
        key = f"base_model.model.{name}.lora_A.weight"
        if adapter is not None and key in adapter:
            lora_a = adapter[key].double()
            cov = covariances.matrices[group]
            optimum = eigen[group][1][:, : lora_a.shape[0]].T
            measured = leakages_from_covariance([lora_a, random_like(lora_a, config.seed), optimum], cov)
            entry.update(zip(("leakage", "leakage_random", "leakage_optimum"), measured, strict=True))
            if task is not None:  # energy = leakage²: the share of an average direction's energy A picks up
                on_task = leakages_from_covariance([lora_a, random_like(lora_a, config.seed)], task.matrices[group])
                entry.update(zip(("task_leakage", "task_leakage_random"), on_task, strict=True))
                entry.update(energy_knowledge=entry["leakage"] ** 2, energy_task=entry["task_leakage"] ** 2)
        layers.append(entry)
    return {
        "calibration": {
            "source": texts.source,
            "used": chosen.used,
            "top_up": chosen.top_up,
            "samples": len(texts.calibration),
            "tokens": max(covariances.tokens.values()),
        },
        "task_data": None if task is None else {"source": task_texts.source, "samples": len(task_texts.calibration)},
        "init": str(init_dir) if init_dir else None,
        "init_settings": settings,
        "rank": rank,
        "layers": layers,
        "spectra": spectra,
    }


def _input_width(module: nn.Module) -> int:
    return int(weight_of(module).shape[0 if isinstance(module, Conv1D) else 1])


def _initial_adapter(init_dir: StrPath | None) -> tuple[dict | None, int | None, dict | None]:
    """The init folder's adapter, rank, and the settings that shape its factors (as its lora_null.json records)."""
    if init_dir is None:
        return None, None, None
    metadata = read_metadata(Path(init_dir))
    recorded = metadata.get("config", {})
    settings = {
        "variant": metadata["variant"],
        "init": metadata["init"],
        "train_base": metadata.get("train_base", "residual"),
        "a_scale": recorded_a_scale(recorded),
    }
    return load_file(str(Path(init_dir) / ADAPTER_DIR / WEIGHTS_FILE)), metadata["lora"]["r"], settings


def _depth(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return 0


def write_report(data: dict[str, Any], output_dir: StrPath, overwrite: bool = False) -> Path:
    """report.html (self-contained: images inlined), the PNGs beside it, and report.json."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise LoraNullError("lora-null inspect draws with matplotlib: pip install 'lora-null[inspect]'.") from err
    with atomic_output_dir(output_dir, overwrite) as staging:
        figures = {"effective_rank.png": _effective_rank_figure(plt, data), "spectra.png": _spectra_figure(plt, data)}
        if any("leakage" in layer for layer in data["layers"]):
            figures["leakage.png"] = _leakage_figure(plt, data)
        images = {}
        for filename, figure in figures.items():
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
            plt.close(figure)
            (staging / filename).write_bytes(buffer.getvalue())
            images[filename] = base64.b64encode(buffer.getvalue()).decode()
        (staging / INSPECT_FILE).write_text(json.dumps(data, indent=1) + "\n")
        (staging / "report.html").write_text(_html(data, images))
    return Path(output_dir)


def _by_type(data: dict[str, Any]) -> dict[str, list[dict]]:
    types: dict[str, list[dict]] = {}
    for layer in data["layers"]:
        types.setdefault(layer["type"], []).append(layer)
    return types


def _effective_rank_figure(plt, data):
    types = _by_type(data)
    figure, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 3), squeeze=False)
    for ax, (kind, layers) in zip(axes[0], types.items(), strict=True):
        depth = [layer["depth"] for layer in layers]
        ax.plot(depth, [layer["effective_rank_weight"] for layer in layers], "o-", label="weight")
        ax.plot(depth, [layer["effective_rank_activations"] for layer in layers], "s-", label="input activations")
        ax.set_title(kind), ax.set_xlabel("block"), ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("effective rank"), axes[0][0].legend(fontsize=7)
    figure.suptitle("Entropy effective rank: activations vs weights", y=1.04)
    return figure


def _spectra_figure(plt, data):
    types = _by_type(data)
    figure, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 3), squeeze=False)
    for ax, (kind, layers) in zip(axes[0], types.items(), strict=True):
        for layer in layers:
            act = torch.tensor(data["spectra"][layer["covariance"]]).clamp_min(1e-30).sqrt()
            weight = torch.tensor(layer["weight_spectrum"])
            ax.semilogy((act / act[0]).tolist(), color="tab:orange", alpha=0.6)
            ax.semilogy((weight / weight[0]).tolist(), color="tab:blue", alpha=0.6)
        ax.set_title(kind), ax.set_xlabel("index")
    axes[0][0].set_ylabel("singular value / largest (blue: weight, orange: activations)", fontsize=7)
    figure.suptitle("Spectra per layer type", y=1.04)
    return figure


def _leakage_figure(plt, data):
    """One panel per layer type, leakage against depth on a log scale: it reads at 30 blocks, where one bar per
    layer (210 on SmolLM2) did not, and keeps A, a random A and the best basis side by side."""
    types = {kind: [layer for layer in layers if "leakage" in layer] for kind, layers in _by_type(data).items()}
    types = {kind: layers for kind, layers in types.items() if layers}
    figure, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 3), squeeze=False, sharey=True)
    for ax, (kind, layers) in zip(axes[0], types.items(), strict=True):
        depth = [layer["depth"] for layer in layers]
        for key, label, style in (
            ("leakage_random", "random A, same norm", "^:"),
            ("leakage", "LoRA-Null A", "o-"),
            ("leakage_optimum", "best r-dim basis", "s--"),
            ("task_leakage", "LoRA-Null A on the task data", "d-"),
        ):
            if key in layers[0]:
                ax.semilogy(depth, [max(layer[key], 1e-6) for layer in layers], style, markersize=3, label=label)
        ax.set_title(kind), ax.set_xlabel("block")
    axes[0][0].set_ylabel("leakage (1 ≈ random)"), axes[0][0].legend(fontsize=7)
    figure.suptitle(
        "Leakage of lora_A (its energy's square root) by layer type and depth: low on knowledge keeps "
        "it, high on the task leaves room to learn",
        y=1.04,
        fontsize=9,
    )
    return figure


def _html(data, images) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(layer['name'])}</td><td>{layer['d_in']}</td><td>{layer['tokens']}</td>"
        f"<td>{layer['effective_rank_activations']:.1f}</td><td>{layer['effective_rank_weight']:.1f}</td>"
        + (
            f"<td>{layer['leakage']:.3g}</td><td>{layer['leakage_random']:.3g}</td><td>{layer['leakage_optimum']:.3g}</td>"
            if "leakage" in layer
            else "<td></td><td></td><td></td>"
        )
        + (f"<td>{layer['task_leakage']:.3g}</td>" if "task_leakage" in layer else "<td></td>")
        + f"<td>{html.escape(layer.get('recommendation', ''))}</td></tr>"
        for layer in data["layers"]
    )
    pictures = "".join(f'<p><img alt="{name}" src="data:image/png;base64,{b64}"></p>' for name, b64 in images.items())
    used = html.escape(str(data["calibration"].get("used", data["calibration"]["source"])))
    init = html.escape(str(data["init"])) + _settings(data.get("init_settings"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lora-null inspect</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}img{{max-width:100%}}</style></head><body>
<h1>lora-null inspect</h1><p>Calibration: {used}. Init: {init}.{_task(data)}</p>
{pictures}
<table><tr><th>layer</th><th>d_in</th><th>tokens</th><th>eff. rank activations</th><th>eff. rank weight</th>
<th>leakage</th><th>random A</th><th>optimum</th><th>on task data</th><th>recommendation</th></tr>{rows}</table>
</body></html>
"""


def _task(data) -> str:
    task = data.get("task_data")
    return f" Task data: {html.escape(str(task['source']))}, {task['samples']} samples." if task else ""


def _settings(settings: dict | None) -> str:
    if not settings:
        return ""
    return html.escape(
        f" ({settings['variant']}, {settings['init']}, trained on the {settings['train_base']} "
        f"weights, a_scale {settings['a_scale']:g})"
    )
