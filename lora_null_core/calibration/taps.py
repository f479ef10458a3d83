"""The pass over calibration data: forward pre-hooks on the targeted layers that show a *visitor* each layer's
input. The pass knows nothing of the method: the covariance sums (covariances.py) are one visitor, held-out
leakage (leakage.py) is another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..console import progress
from ..errors import UnsupportedModelError
from ..model_parts import input_device
from .batches import TokenBatch


class LayerInput:
    """One layer's input for one batch, as visitors read it.

    `masked` holds every position with padding rows zeroed: sums over it (x xᵀ, ‖A x‖²) equal the sums over the
    real tokens, and it needs no host synchronisation, so the GPU never waits inside a hook (a batch without
    padding is the input itself, not a copy). `tokens` and `sample_ids` hold the real tokens alone (boolean
    indexing: one host sync), for visitors that need rows.
    `num_tokens` and `num_samples` come from the batch on the host.
    """

    def __init__(self, raw: torch.Tensor, mask: torch.Tensor, num_tokens: int, num_samples: int, name: str) -> None:
        self.raw, self.mask, self.name = raw, mask, name
        self.num_tokens, self.num_samples = num_tokens, num_samples
        self._masked: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def masked(self) -> torch.Tensor:
        if self._masked is None:
            flat = _rows_by_position(self.raw, self.mask, self.name)
            if self.num_tokens == self.mask.numel():  # no padding (known on the host): no copy to zero it
                self._masked = flat
            else:
                self._masked = flat * self.mask.reshape(-1, 1).to(flat.dtype)
        return self._masked

    @property
    def tokens(self) -> torch.Tensor:
        return self._real_rows()[0]

    @property
    def sample_ids(self) -> torch.Tensor:
        return self._real_rows()[1]

    def _real_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            self._rows = non_padding_tokens(self.raw, self.mask, self.name)
        return self._rows


# visit(module_name, inputs, same_as): same_as names the first module that read the very same input tensor in
# this forward pass (q/k/v, gate/up), so a visitor can reuse its work.
Visitor = Callable[[str, LayerInput, str | None], None]


class InputTaps:
    """Forward pre-hooks on `modules` that show `visit` each module's input (a LayerInput).

    Used as a context manager; call `set_batch(mask, counts)` before each forward so padding can be dropped.
    `visit` may be swapped between batches (calibration sums, then held-out leakage).
    """

    def __init__(self, modules: Mapping[str, nn.Module], visit: Visitor) -> None:
        self.modules, self.visit = modules, visit
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._counts = (0, 0)
        self._last: tuple = (None, None, None)  # raw input, leader name, its LayerInput

    def set_batch(self, mask: torch.Tensor, counts: tuple[int, int] | None = None) -> None:
        """`counts`: (real tokens, samples) of the batch, known on the host; from `mask` otherwise."""
        self._mask, self._last = mask.bool(), (None, None, None)
        self._counts = counts if counts is not None else batch_counts(mask)

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            raw = args[0]
            last_raw, leader, inputs = self._last
            if raw is last_raw:
                self.visit(name, inputs, leader)
                return
            if self._mask is None:
                raise RuntimeError("InputTaps.set_batch was not called before the forward pass")
            if self._mask.device != raw.device:
                self._mask = self._mask.to(raw.device)
            inputs = LayerInput(raw, self._mask, *self._counts, name)
            # Holding `raw` keeps its storage alive, so identity really means "the same tensor".
            self._last = (raw, name, inputs)
            self.visit(name, inputs, None)

        return hook

    def __enter__(self) -> InputTaps:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], (None, None, None)


def batch_counts(mask: torch.Tensor) -> tuple[int, int]:
    """(real tokens, samples with a token) of a padding mask."""
    real = mask.bool()
    return int(real.sum()), int(real.any(dim=1).sum())


def run_activation_pass(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[TokenBatch],
    visit: Visitor,
    desc: str = "calibration",
) -> None:
    """Run every batch through `model` (no grad, eval mode) and show `visit` each module's input tokens."""
    was_training = model.training
    device = input_device(model)
    model.eval()
    try:
        extra = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}  # a 16k-token batch × 128k vocab
        with torch.no_grad(), InputTaps(modules, visit) as taps:
            for batch in progress(list(batches), desc, "batch"):
                taps.set_batch(batch.attention_mask, batch_counts(batch.attention_mask))  # on the CPU: no sync
                model(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    use_cache=False,
                    **extra,
                )
    finally:
        model.train(was_training)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """The pass needs the layers' inputs, not the logits: transformers' causal LMs can skip all but one position."""
    import inspect

    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _rows_by_position(raw: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """(batch·seq, d_in): a layer input laid out one row per mask position."""
    batch, seq = mask.shape
    if raw.dim() == 3 and raw.shape[:2] == mask.shape:
        return raw.reshape(batch * seq, raw.shape[-1])
    if raw.dim() == 2 and raw.shape[0] == batch * seq:
        return raw
    raise _misaligned(raw, mask, name)


def _misaligned(raw: torch.Tensor, mask: torch.Tensor, name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Input of {name} has shape {tuple(raw.shape)}, which does not line up with the batch {tuple(mask.shape)}, "
        "so padding cannot be masked. Layers that see packed or reshaped tokens cannot be calibrated; leave them "
        "out of target_modules."
    )


def non_padding_tokens(raw: torch.Tensor, mask: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d_in) rows of a layer input that belong to real tokens, and the sample each came from."""
    batch, seq = mask.shape
    sample_of = torch.arange(batch, device=mask.device).unsqueeze(1).expand(batch, seq)
    if raw.dim() == 3 and raw.shape[:2] == mask.shape:
        return raw[mask], sample_of[mask]
    if raw.dim() == 2 and raw.shape[0] == batch * seq:
        flat = mask.reshape(-1)
        return raw[flat], sample_of.reshape(-1)[flat]
    raise _misaligned(raw, mask, name)
