"""The method's own knobs. LoRA's knobs (r, alpha, targets, dropout, rsLoRA) stay in peft's LoraConfig."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

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
    """The method's settings. LoRA's own (r, alpha, targets, dropout, rsLoRA) stay in PEFT's LoraConfig; every field
    is also a CLI flag (`--num-samples`) and a framework key (`lora_null_num_samples`). Measured effects and the
    numbers behind the defaults are in the docs (docs/config.md).

    Args:
        variant (`Literal["v1", "v2"]`, defaults to `"v2"`): v1 trains lora_A and lora_B; v2 freezes lora_A so every
            update stays in the null space.
        init (`Literal["projected", "basis"]`, defaults to `"projected"`): projected: A and B factor the weight
            projected onto the null space; basis: A is the null basis and B is 0 (works on quantized bases).
        train_base (`Literal["auto", "original", "residual"]`, defaults to `"auto"`): the weights the adapter trains
            on. original: the base untouched and B = 0, so a training save is a LoRA for the original model;
            residual: the paper's base W − s·B₀A₀ (export after training); auto: original for v2 and basis, residual
            for v1.
        num_samples (`int`, defaults to 256): calibration samples the covariances are summed over (the usual amount:
            more of the text is read when it is short, see short_calibration).
        holdout_samples (`int`, defaults to 32): further samples, disjoint from calibration, on which leakage is
            measured (0: skip).
        max_length (`int`, defaults to 512): tokens per calibration sample; longer ones are cut.
        batch_tokens (`int`, defaults to 16384): padded tokens per calibration forward pass (lower it if activations
            do not fit).
        batch_size (`Optional[int]`, defaults to `None`): also cap the samples per forward pass.
        seed (`int`, defaults to 0): seed of the sample choice, the own-text sampling and the random-A baseline.
        text_field (`str`, defaults to `"text"`): the column holding the text; rows with a `messages` column go through
            the chat template.
        generated_length (`int`, defaults to 128): tokens per sample of the model's own text at most.
        generated_temperature (`float`, defaults to 1.3): sampling temperature of the model's own text.
        generated_top_p (`float`, defaults to 0.95): nucleus (top-p) of the model's own text.
        generated_prompt (`Literal["bos", "chat"]`, defaults to `"bos"`): where the own samples start: the BOS token
            alone, or neutral requests through the chat template.
        generated_decoding (`Literal["generate", "graphed"]`, defaults to `"generate"`): how the own samples are
            drawn: transformers' generate, or each decoding step replayed as one CUDA graph (on a GPU, from BOS, not
            under ZeRO-3, transformers >= 5; elsewhere generate draws): 2.5-2.9x faster on the Llama-2-7B shape.
        task_mix (`float`, defaults to 0.01): with task data, the shift μ of the task-aware solve C_k u = λ(C_t + μI)u
            (each covariance at trace d_in); larger values approach the plain null space.
        task_samples (`int`, defaults to 256): task examples whose inputs make the task covariance.
        weight_prior (`float`, defaults to 0.0): experimental (off at 0): β in C/tr + β·WᵀW/tr, the knowledge
            covariance the bases are solved from, so the input directions a layer's weight responds to most are
            avoided where calibration samples are thin (the q/k/v or gate/up sharing an input add their WᵀW).
        covariance_weighting (`Literal["token_sum", "per_sample_max"]`, defaults to `"token_sum"`): plain Σ x xᵀ over
            tokens, or each sample divided by |max(x)| and averaged, as the authors' CorDA-based code does.
        accumulate_dtype (`Literal["float32", "float64"]`, defaults to `"float32"`): precision of the covariance sums.
        min_tokens_per_dim (`float`, defaults to 1.0): the floor of distinct contexts per input dimension of the
            widest targeted layer (below it the null space is chosen by rounding); 0 disables it.
        short_calibration (`Literal["top_up", "refuse"]`, defaults to `"top_up"`): knowledge text under that floor
            is read further, then topped up with the model's own text; or refused.
        streaming (`Literal["auto", "on", "off"]`, defaults to `"auto"`): calibrate and initialize one decoder block
            at a time (auto: whenever the model's blocks allow it).
        overlap (`Literal["auto", "on", "off"]`, defaults to `"auto"`): with streaming, solve block i while block
            i+1 calibrates (auto: on when the GPU holds the weights).
        solver (`Literal["auto", "eigh64", "eigh32", "subspace"]`, defaults to `"auto"`): how the least-used
            directions are found (auto: the Krylov subspace solver on GPUs for layers 1024 wide or more, else eigh64).
        max_function_error (`Optional[float]`, defaults to `None`): refuse the init when the model's output moves more
            than this, relative (default: 1e-3, or 10× the weights' dtype epsilon if larger).
        a_scale (`Optional[float]`, defaults to `None`): lora_A times this and lora_B divided by it: the same function,
            a faster frozen A under Adam (default: FROZEN_A_SCALE for v2, TASK_A_SCALE with task data, 1 for v1).
        covariance_cache (`Optional[str]`, defaults to `None`): a folder where the calibration covariances are kept, so
            a later run with another rank, variant or init reads them instead of calibrating.
    """

    variant: Variant = field(default="v2", metadata={"help": "v1 trains A and B; v2 freezes A in the null space."})
    init: InitMode = field(
        default="projected",
        metadata={
            "help": "projected: A, B from the weight projected onto the null space; basis: A = null basis, B = 0."
        },
    )
    train_base: Literal["auto", "original", "residual"] = field(
        default="auto",
        metadata={
            "help": "original: base untouched, B = 0; residual: base W − s·B₀A₀ (export after); auto: per variant."
        },
    )
    num_samples: int = field(default=256, metadata={"help": "Calibration samples (more are read from a short file)."})
    holdout_samples: int = field(
        default=32, metadata={"help": "Held-out samples for leakage, disjoint from calibration (0: skip)."}
    )
    max_length: int = field(default=512, metadata={"help": "Tokens per calibration sample (longer ones are cut)."})
    batch_tokens: int = field(default=16384, metadata={"help": "Padded tokens per calibration forward pass."})
    batch_size: int | None = field(default=None, metadata={"help": "Also cap the samples per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample choice, own-text sampling and random baseline."})
    text_field: str = field(default="text", metadata={"help": "The column holding the text ('messages': chat rows)."})
    generated_length: int = field(default=128, metadata={"help": "Tokens per sample of the model's own text at most."})
    generated_temperature: float = field(default=1.3, metadata={"help": "Sampling temperature of the own text."})
    generated_top_p: float = field(default=0.95, metadata={"help": "Nucleus (top-p) of the own text."})
    generated_prompt: Literal["bos", "chat"] = field(
        default="bos", metadata={"help": "Own samples start from BOS alone, or from neutral chat requests."}
    )
    generated_decoding: Literal["generate", "graphed"] = field(
        default="generate",
        metadata={"help": "Own samples drawn by generate, or replayed step by step from a CUDA graph (GPU)."},
    )
    task_mix: float = field(
        default=0.01, metadata={"help": "Shift of the task-aware solve (larger: nearer the plain null space)."}
    )
    task_samples: int = field(default=256, metadata={"help": "Task examples whose inputs make the task covariance."})
    weight_prior: float = field(
        default=0.0,
        metadata={"help": "Experimental: β of the weight prior added to the knowledge covariance (0: off)."},
    )
    covariance_weighting: Weighting = field(
        default="token_sum", metadata={"help": "token_sum: Σ x xᵀ; per_sample_max: the authors' per-sample scaling."}
    )
    accumulate_dtype: Literal["float32", "float64"] = field(
        default="float32", metadata={"help": "Precision of the covariance sums."}
    )
    min_tokens_per_dim: float = field(
        default=1.0, metadata={"help": "Distinct contexts needed per input dimension of the widest layer (0: off)."}
    )
    short_calibration: ShortCalibration = field(
        default="top_up", metadata={"help": "Text under that floor: top_up with the model's own text, or refuse."}
    )
    streaming: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "Calibrate and initialize one decoder block at a time."}
    )
    overlap: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "With streaming, solve one block while the next calibrates."}
    )
    solver: Literal["auto", "eigh64", "eigh32", "subspace"] = field(
        default="auto", metadata={"help": "How the least-used directions are found (auto: by device and width)."}
    )
    max_function_error: float | None = field(
        default=None, metadata={"help": "Refuse an init whose output moves more than this (default: by dtype)."}
    )
    a_scale: float | None = field(
        default=None,
        metadata={"help": "Scale A up and B down: the same function, a faster frozen A (default: by variant)."},
    )
    covariance_cache: str | None = field(
        default=None, metadata={"help": "Folder where calibration covariances are kept for later runs."}
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
            isinstance(self.a_scale, (int, float)) and 0 < self.a_scale < float("inf")
        ):
            raise ConfigError(f"a_scale={self.a_scale!r} must be a positive number (1 keeps the paper's factors).")
        if not self.task_mix > 0:
            raise ConfigError(f"task_mix={self.task_mix} must be positive (larger: closer to the plain null space).")
        if not (self.generated_temperature > 0 and 0 < self.generated_top_p <= 1):
            raise ConfigError(
                f"generated_temperature={self.generated_temperature} must be positive and "
                f"generated_top_p={self.generated_top_p} in (0, 1]."
            )
        if self.holdout_samples < 0 or self.min_tokens_per_dim < 0:
            raise ConfigError("holdout_samples and min_tokens_per_dim must not be negative.")
        if not 0 <= self.weight_prior < float("inf"):
            raise ConfigError(f"weight_prior={self.weight_prior} must be 0 (off) or a positive number.")

    @property
    def residual(self) -> bool:
        """True when init rewrites the base weights to W − s·B₀A₀ (projected init trained on the residual)."""
        if self.init == "basis":
            return False
        return self.train_base == "residual" or (self.train_base == "auto" and self.variant == "v1")

    def applied_a_scale(self, task_aware: bool = False) -> float:
        """a_scale as applied, decided here alone: the value given; else, for v2 and basis (frozen A),
        TASK_A_SCALE when A is task-aware and FROZEN_A_SCALE when it is not; 1 for v1 (A trains)."""
        if self.a_scale is not None:
            return float(self.a_scale)
        if self.variant != "v2":
            return 1.0
        return TASK_A_SCALE if task_aware else FROZEN_A_SCALE

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
