"""Exponential moving average of a model's weights, for evaluation and sampling (Polyak averaging).

    ema = EMA(model, decay=0.999)
    ...; optimizer.step(); ema.update(model)
    with ema.applied(model):          # the averaged weights in place, the trained ones back afterwards
        images = generate(model, 16)

After update n the average is  ema = d_n * ema + (1 - d_n) * w  with  d_n = min(decay, (1 + n) / (10 + n)),
TensorFlow's `ExponentialMovingAverage(num_updates=n)` rule: early averages are not dominated by the random
initial weights, which matters for short runs (0.999^1000 = 0.37 would otherwise remain on the initialisation
after 1000 steps). Only trainable parameters are averaged (frozen ones, like MAGE's tokenizer, never change);
the averages are kept in float32 and are part of the training checkpoint, so a resumed run continues them
exactly.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from ._checks import InputValueError


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise InputValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        params = dict(model.named_parameters())
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names],
                             1.0 - self.current_decay())

    @torch.no_grad()
    def reset_rows(self, model: nn.Module, name: str, rows: torch.Tensor) -> None:
        """Set rows of one averaged parameter to the model's current values (restarted codebook entries: an
        average of the dead code and its replacement would be neither)."""
        self.shadow[name][rows] = dict(model.named_parameters())[name].detach()[rows].float()

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block the model holds the averaged weights; its own are restored on exit."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, avg in self.shadow.items():
                params[n].copy_(avg)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """Checked before anything is changed: copy_ would broadcast a wrong-shaped average into place, and
        NaN averages would reach the final weights."""
        if not isinstance(state, dict) or not isinstance(state.get("shadow"), dict):
            raise InputValueError(f"the EMA state must be a dict with 'shadow' and 'updates', got "
                                  f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        updates = state.get("updates")
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise InputValueError(f"the EMA state's updates must be an int >= 0, got {updates!r}")
        if set(state["shadow"]) != set(self.shadow):
            raise InputValueError("the EMA state does not match the model's trainable parameters")
        for n, v in state["shadow"].items():
            if not isinstance(v, torch.Tensor) or v.shape != self.shadow[n].shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise InputValueError(f"the EMA average of {n!r} must have shape {tuple(self.shadow[n].shape)}, got "
                                      f"{got}")
            if not bool(torch.isfinite(v).all()):
                raise InputValueError(f"the EMA average of {n!r} has NaN or inf values")
        self.updates = updates
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
