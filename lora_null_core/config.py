"""The method's own knobs. LoRA's knobs (r, alpha, targets, dropout, rsLoRA) stay in peft's LoraConfig."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import ConfigError

Variant = Literal["v1", "v2"]
InitMode = Literal["projected", "basis"]
Weighting = Literal["token_sum", "per_sample_max"]
ShortCalibration = Literal["top_up", "refuse"]

# The default a_scale of a frozen-A (v2) adapter. On the frontier benchmark (two model families, two tasks each),
# 2 is the factor at which the default, trained at LoRA's own learning rate, reaches LoRA's task score while
# losing at most about half its knowledge; 1 under-trains on Gemma-3, 3 forgets more (benchmarks/results).
FROZEN_A_SCALE = 2.0
# With task data the task-aware A already carries 3-4x an average direction's task energy: at 2 it reaches the
# task at a third of LoRA's rate and overshoots at LoRA's own; at 1 (the paper's factors) it learns at LoRA's pace
# and loses less there on three of the frontier's four pairs (README, "Task-aware").
TASK_A_SCALE = 1.0


@dataclass(frozen=True)
class LoraNullConfig:
    variant: Variant = field(
        default="v2",
        metadata={"help": "v1 trains lora_A and lora_B; v2 freezes lora_A so every update stays in the null space."},
    )
    init: InitMode = field(
        default="projected",
        metadata={
            "help": "projected: A, B factor the weight projected onto the null space, base becomes W - s·B·A. "
            "basis: A = null basis, B = 0, base untouched (works on quantized bases). Both then scale A by a_scale."
        },
    )
    train_base: Literal["auto", "original", "residual"] = field(
        default="auto",
        metadata={
            "help": "The weights the adapter trains on. original: base untouched, A = A₀ (projected) and B = 0, so "
            "what training saves is a standard LoRA for the original model; with v2 it trains exactly as the "
            "residual form does (without weight decay or LoRA dropout). residual: the paper's form, base "
            "W − s·B₀A₀ and B = B₀; run `export` after training. auto: original for v2 and basis, residual for v1 "
            "(whose update B·A − B₀·A₀ is no single rank-r LoRA on the original weights)."
        },
    )
    num_samples: int = field(default=256, metadata={"help": "Calibration samples used for the covariance."})
    holdout_samples: int = field(
        default=32,
        metadata={"help": "Further samples, disjoint from calibration, on which leakage is measured (0: skip)."},
    )
    max_length: int = field(default=512, metadata={"help": "Tokens per calibration sample (longer ones are cut)."})
    batch_tokens: int = field(
        default=16384,
        metadata={
            "help": "Padded tokens per calibration forward pass: samples are sorted by length and packed up to this, "
            "so the pass costs what its tokens cost, not one call per few rows. Lower it if activations do not fit."
        },
    )
    batch_size: Optional[int] = field(
        default=None, metadata={"help": "Also cap the samples per forward pass (default: batch_tokens alone decides)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for choosing calibration samples and the random-A baseline."})
    text_field: str = field(
        default="text",
        metadata={"help": "Column holding the text; rows with a 'messages' column use the chat template instead."},
    )
    generated_length: int = field(
        default=128,
        metadata={"help": "Without calibration text the model's own samples are the knowledge source: at most this "
                  "many tokens each (num_samples + holdout_samples of them)."},
    )
    generated_temperature: float = field(
        default=1.3,
        metadata={"help": "Sampling temperature of the model's own text (1.3: less knowledge and more task energy "
                  "in A than 1, and the better frontier on three of four model x task pairs)."},
    )
    generated_top_p: float = field(default=0.95, metadata={"help": "Nucleus (top-p) of the model's own text."})
    generated_prompt: Literal["bos", "chat"] = field(
        default="bos",
        metadata={"help": "Where the model's own samples start. bos: from the BOS token alone (EOS where there is "
                  "none). chat: from neutral requests ('Tell me something you know.') through the chat template."},
    )
    task_mix: float = field(
        default=0.01,
        metadata={"help": "With task data (the fine-tuning inputs) A is chosen where knowledge inputs are weak "
                  "relative to task inputs: the r smallest generalized eigenvectors of C_k u = λ (C_t + task_mix·I) "
                  "u, each covariance scaled to trace d_in. Larger values approach the plain null space. Without "
                  "task data it is unused."},
    )
    task_samples: int = field(default=256, metadata={"help": "Task examples whose inputs make the task covariance."})
    covariance_weighting: Weighting = field(
        default="token_sum",
        metadata={
            "help": "token_sum: plain Σ x xᵀ over tokens. per_sample_max: each sample divided by |max(x)| and "
            "averaged over samples, as the authors' CorDA-based code does (for exact parity)."
        },
    )
    accumulate_dtype: Literal["float32", "float64"] = field(
        default="float32", metadata={"help": "Precision of the covariance sums (never lower than float32)."}
    )
    min_tokens_per_dim: float = field(
        default=1.0,
        metadata={
            "help": "Refuse a layer whose calibration tokens number fewer than this times its input width: below "
            "that the covariance is rank-deficient and the null space is chosen by rounding, not by data. 0 disables."
        },
    )
    short_calibration: ShortCalibration = field(
        default="top_up",
        metadata={
            "help": "Knowledge text with fewer distinct contexts than min_tokens_per_dim times the widest targeted "
            "input. top_up: read more of it than num_samples, then add the model's own text until there are enough. "
            "refuse: stop with an error, as the check alone does."
        },
    )

    streaming: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "Calibrate and initialize one decoder block at a time (peak memory: one block, its inputs and "
            "its covariances). auto: whenever the model's blocks allow it; off: one whole-model pass."
        },
    )

    overlap: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "With streaming, solve block i's null bases on a worker thread while block i+1 calibrates: a 7B "
            "on an H100 took 15 s instead of 18 with the older solver, for a second block's covariances on the GPU. auto: on when the GPU "
            "holds the weights (one process or several); off with --offload, where it raised the peak 40-55 % for "
            "little or no gain (benchmarks/results/speed.md). on: always. off: never."
        },
    )

    solver: Literal["auto", "eigh64", "eigh32", "subspace"] = field(
        default="auto",
        metadata={
            "help": "How the r least-used directions are found. eigh64: exact float64 eigendecomposition. eigh32: "
            "float32 (faster on GPUs). subspace: a Cholesky-based shift-inverted block Krylov space (fastest on wide layers, "
            "approximate: see benchmarks/speed for its energy against eigh64). auto: subspace on GPUs for layers "
            "1024 wide or more, eigh64 otherwise."
        },
    )

    max_function_error: Optional[float] = field(
        default=None,
        metadata={
            "help": "Refuse the init (nothing is saved) when the model's output moves more than this, relative. "
            "Default: 1e-3, or 10× the machine epsilon of the weights' dtype if larger (bf16: 0.078)."
        },
    )

    a_scale: Optional[float] = field(
        default=None,
        metadata={
            "help": "Multiply lora_A by this and lora_B by its inverse: the same function, but with Adam the "
            "frozen-A adapter then learns about this many times faster at the same learning rate. Default: "
            f"{FROZEN_A_SCALE:g} for v2 (frozen A), so that it learns the task at LoRA's own learning rate (chosen on "
            f"the frontier benchmark, see README), {TASK_A_SCALE:g} with task data, 1 for v1 (A trains). 1 keeps "
            "the paper's factors."
        },
    )

    covariance_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder for the calibration covariances (safetensors, keyed by the model's weights, the "
            "calibration tokens and the settings). A later run with another rank, variant or init reads them "
            "instead of calibrating. Size: 4·d² bytes per distinct layer input (about 22 GB for a 7B model with "
            "all linear layers targeted)."
        },
    )

    def __post_init__(self) -> None:
        for name, allowed in literal_choices().items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        for name in ("num_samples", "max_length", "batch_tokens", "generated_length", "task_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1 (or None: batch_tokens decides).")
        if self.train_base == "original" and self.variant == "v1" and self.init == "projected":
            raise ConfigError(
                "train_base='original' needs variant v2 (or init basis): v1 trains A as well, and its update "
                "B·A − B₀·A₀ is no rank-r LoRA on the original weights. Use train_base 'residual' (then export) or v2."
            )
        if self.a_scale is not None and not (
                isinstance(self.a_scale, (int, float)) and 0 < self.a_scale < float("inf")):
            raise ConfigError(f"a_scale={self.a_scale!r} must be a positive number (1 keeps the paper's factors).")
        if not self.task_mix > 0:
            raise ConfigError(f"task_mix={self.task_mix} must be positive (larger: closer to the plain null space).")
        if not (self.generated_temperature > 0 and 0 < self.generated_top_p <= 1):
            raise ConfigError(f"generated_temperature={self.generated_temperature} must be positive and "
                              f"generated_top_p={self.generated_top_p} in (0, 1].")
        if self.holdout_samples < 0 or self.min_tokens_per_dim < 0:
            raise ConfigError("holdout_samples and min_tokens_per_dim must not be negative.")

    @property
    def residual(self) -> bool:
        """True when init rewrites the base weights to W − s·B₀A₀ (projected init trained on the residual)."""
        if self.init == "basis":
            return False
        return self.train_base == "residual" or (self.train_base == "auto" and self.variant == "v1")

    @property
    def resolved_a_scale(self) -> float:
        """a_scale as applied: the one given, else FROZEN_A_SCALE for v2 (frozen A) and 1 for v1."""
        if self.a_scale is not None:
            return float(self.a_scale)
        return FROZEN_A_SCALE if self.variant == "v2" else 1.0

    def replace(self, **changes: Any) -> LoraNullConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"Unknown LoraNullConfig field(s): {', '.join(sorted(unknown))}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def literal_choices() -> dict[str, tuple[Any, ...]]:
    """Each Literal field's allowed values, read from its type: the one list the CLI, the plugins and the
    validation above all use."""
    hints = typing.get_type_hints(LoraNullConfig)
    return {name: typing.get_args(kind) for name, kind in hints.items() if typing.get_origin(kind) is Literal}
