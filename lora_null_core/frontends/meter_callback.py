"""The forgetting meter in a training run: `forgetting/kl` (and `forgetting/ce_rise` with knowledge text) logged
through the trainer's own log every few steps and at the end, so they reach the console, TensorBoard and W&B like
the loss. A plugin draws the reference where it holds the model before training (`meter_for`), adds the callback,
and attaches the trainer once it exists."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from time import perf_counter
from typing import Any

from transformers import Trainer, TrainerCallback

from ..calibration.sources import CalibrationSource
from ..calibration.texts import held_out_texts
from ..config import LoraNullConfig
from ..distributed import any_rank, rank_and_world
from ..errors import ConfigError
from ..layout import FORGETTING_REFERENCE
from ..meter.measure import forgetting
from ..meter.reference import ForgettingReference, forgetting_reference

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 50  # the default pace: one reading (64 sequences of forwards) per 50 steps, ...
TIME_SHARE = 0.05  # ... fewer where readings would take more than this share of the training's time


class ForgettingCallback(TrainerCallback):
    """Measures the model the trainer trains against its reference every `every` steps and after the last step. The
    reference is drawn (`draw`) where the plugin holds the model before training, before any init rewrites it.

    `every` None (the default): every 50 steps, but a reading is skipped unless the readings so far, this one and the
    one at the end (each priced at what the last took) fit in 5 % of the training time so far: the whole run's
    readings, the last included, then cost at most 5 % of its training time once it trains for 20 readings' time (a
    few tens of seconds on a 1.5B). A small model's short steps would otherwise pay 16-42 % (frontier runs,
    2026-12-06). Every rank takes the same decision, since a reading is collective. A number of steps given is kept
    to exactly."""

    def __init__(self, every: int | None = None, reference: ForgettingReference | None = None) -> None:
        self.reference, self.every = reference, every or DEFAULT_STEPS
        self.time_share = None if every else TIME_SHARE
        self.trainer: Any = None
        self._measured_at = -1
        self._reading_seconds = _scoring_seconds(reference)  # what the last reading took (before one: an estimate)
        self._meter_seconds = 0.0  # what every reading so far took: logged, so a run shows what the meter cost
        self._began = perf_counter()  # when training began

    def draw(
        self,
        model: Any,
        tokenizer: Any,
        knowledge: CalibrationSource | None = None,
        config: LoraNullConfig | None = None,
        device: Any = None,
    ) -> ForgettingCallback:
        """The reference drawn now from `model` as it is (a PeftModel's adapter off); every process takes part and
        ends with the same one. `knowledge`: the run's knowledge file, whose held-out rows (those an init with
        `config` holds out) give `forgetting/ce_rise`."""
        texts = held_out_texts(knowledge, tokenizer, config or LoraNullConfig()) if knowledge is not None else None
        self.reference = forgetting_reference(model, tokenizer, texts=texts, device=device)
        self._reading_seconds = _scoring_seconds(self.reference)
        logger.info(
            "Forgetting meter: %d samples of the model's own text (%d tokens)%s, measured every %d steps%s.",
            len(self.reference.ids),
            self.reference.tokens,
            f" and {len(texts)} held-out knowledge rows" if texts else "",
            self.every,
            f" within {self.time_share:.0%} of training time" if self.time_share else "",
        )
        return self

    def attach(self, trainer: Any) -> ForgettingCallback:
        """The trainer whose log the values go through (and whose model is measured)."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._began, self._meter_seconds = perf_counter(), 0.0  # a second train() budgets its own readings
        if self.reference is not None and rank_and_world()[0] == 0 and state.global_step == 0:
            self.reference.save(Path(args.output_dir) / FORGETTING_REFERENCE)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 and self._within_time_share():
            self._measure(state, model)

    def _within_time_share(self) -> bool:
        if self.time_share is None:
            return True
        trained = perf_counter() - self._began - self._meter_seconds
        return any_rank(self._meter_seconds + 2 * self._reading_seconds <= self.time_share * trained)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step != self._measured_at:
            self._measure(state, model)

    def _measure(self, state: Any, model: Any) -> None:
        if self.trainer is None or self.reference is None:
            raise ConfigError(
                "The forgetting meter needs its reference drawn (draw) and a trainer to log through "
                "(attach) before training."
            )
        started = perf_counter()
        result = forgetting(getattr(self.trainer, "model", None) or model, self.reference)
        metrics = {
            f"forgetting/{key}": float(value) for key, value in result.items() if key != "tokens" and value is not None
        }
        self._reading_seconds = perf_counter() - started
        self._meter_seconds += self._reading_seconds
        metrics["forgetting/seconds"] = round(self._meter_seconds, 3)
        # Trainer's own log, not a subclass's: TRL's would flush its step metrics early
        Trainer.log(self.trainer, metrics)
        self._measured_at = state.global_step


def _scoring_seconds(reference: ForgettingReference | None) -> float:
    """What scoring the reference took when it was drawn: the same forwards as a reading, so the default pace
    prices the first reading too (on the 1.5B's one-minute framework runs, the first reading took 1.2-4.1 s)."""
    return float(reference.settings.get("scoring_seconds", 0.0)) if reference is not None else 0.0


def meter_wanted(values: Mapping[str, Any], adapter_init: Any) -> tuple[bool, int | None]:
    """(on, every how many steps: None for the default pace) from a framework config's `lora_null_forgetting` and
    `lora_null_forgetting_steps`: on when asked for, and by default with `adapter_init: lora_null`."""
    setting = values.get("lora_null_forgetting")
    steps = values.get("lora_null_forgetting_steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"lora_null_forgetting_steps={steps!r} must be a whole number of steps, at least 1.")
    if isinstance(setting, str):  # a value a launcher passed on as text (LLaMA Board keeps false only as text)
        words = {
            "true": True,
            "on": True,
            "yes": True,
            "1": True,
            "false": False,
            "off": False,
            "no": False,
            "0": False,
        }
        if setting.lower() not in words:
            raise ConfigError(f"lora_null_forgetting={setting!r} is not true or false.")
        setting = words[setting.lower()]
    on = setting if setting is not None else adapter_init == "lora_null"
    return bool(on), steps


def attach_meters(trainer: Any) -> None:
    """Give every ForgettingCallback among a trainer's callbacks that trainer (for a framework that builds the trainer
    itself from a list of callbacks)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ForgettingCallback):
            callback.attach(trainer)
