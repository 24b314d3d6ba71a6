"""The denoiser the samplers call: classifier-free guidance and ControlNet units live here, so a
sampler never sees either (the k-diffusion contract: ``denoise(x, t) -> model output``).

Control modes (docs/reference.md, "Control units and modes"):

- ``balanced``: residuals times ``strength`` on both sides of guidance (the original default);
- ``prompt`` ("My prompt is more important"): the soft scales ``strength * 0.825 ** (12 - i)``;
- ``control`` ("ControlNet is more important"): soft scales, and the unconditional side runs
  without this unit: the original apps' guess mode.

A unit acts on step ``i`` of ``N`` when ``i / N >= start`` and ``(i + 1) / N <= end`` (diffusers'
rule); outside that window its ControlNet is not run at all. Which units act at which step is
decided once, from the plan's timesteps (``control_schedule``); the denoiser finds the step from the
timestep it is called with, so it holds no step counter that someone else must keep up to date.

T2I-Adapter units (`ActiveAdapter`) carry feature maps computed once per generation, already times
their strength; the same window rule decides their steps, and at each step the features of the
adapters inside their windows are summed (diffusers' ``MultiAdapter`` with ``adapter_weights``),
once per distinct set of adapters, when the denoiser is built. Both halves of the guidance batch get
them (diffusers' ``StableDiffusionAdapterPipeline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..models.controlnet import ControlNet, scale_residuals, soft_control_scales
from ..models.controlnet_union import UnionHint
from ..models.unet import UNet


class ControlMode(str, Enum):
    BALANCED = "balanced"
    PROMPT = "prompt"  # "My prompt is more important"
    CONTROL = "control"  # "ControlNet is more important" = guess mode

    @classmethod
    def parse(cls, value: str | ControlMode) -> ControlMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown control mode {value!r}; choose one of {choices}") from None


@dataclass
class ActiveControl:
    """One ControlNet unit, prepared for a generation: its hint features are computed once."""

    controlnet: ControlNet
    # What its encode_hint made: [1, model_channels, h, w], broadcast over the batch (a union
    # ControlNet's: a UnionHint of one or more conditions, models/controlnet_union.py).
    hint_features: torch.Tensor | UnionHint
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: ControlMode = ControlMode.BALANCED
    scales: list[float] | None = None  # per-residual multipliers; None: derived from strength and mode

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"control window must satisfy 0 <= start <= end <= 1, got {self.start}..{self.end}")
        self.mode = ControlMode.parse(self.mode)
        count = len(self.controlnet.zero_convs) + 1
        if self.scales is None:
            soft = self.mode is not ControlMode.BALANCED
            self.scales = soft_control_scales(self.strength, count) if soft else [self.strength] * count
        elif len(self.scales) != count:
            raise ValueError(f"this ControlNet takes {count} control scales, got {len(self.scales)}")

    @property
    def conditional_only(self) -> bool:
        return self.mode is ControlMode.CONTROL

    def active_at(self, step: int, total: int) -> bool:
        return step / total >= self.start and (step + 1) / total <= self.end

    def residuals(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The unit's scaled residuals for a batch (the hint features broadcast over it); ``y``:
        SDXL's vector, as the UNet reads it."""
        raw = self.controlnet(x, self.hint_features, t, context, y)
        return scale_residuals(raw, self.scales, self.controlnet.config.global_average_pooling)


@dataclass
class ActiveAdapter:
    """One T2I-Adapter unit, prepared for a generation: its feature maps (one per UNet level, [1, C,
    h, w], broadcast over the batch) computed once and already scaled by the unit's strength."""

    features: list[torch.Tensor]
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"adapter window must satisfy 0 <= start <= end <= 1, got {self.start}..{self.end}")

    def active_at(self, step: int, total: int) -> bool:
        return step / total >= self.start and (step + 1) / total <= self.end


def sum_adapter_features(adapters: Sequence[ActiveAdapter]) -> list[torch.Tensor] | None:
    """Several adapters at once: their (scaled) features add up, level by level, in unit order."""
    if not adapters:
        return None
    total = list(adapters[0].features)
    for adapter in adapters[1:]:
        total = [a + b for a, b in zip(total, adapter.features, strict=True)]
    return total


def _sum_residuals(groups: Sequence[list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """Several ControlNets at once: their residuals add up, level by level."""
    if not groups:
        return None
    total = list(groups[0])
    for group in groups[1:]:
        total = [a + b for a, b in zip(total, group, strict=True)]
    return total


def control_schedule(
    controls: Sequence[ActiveControl | ActiveAdapter], timesteps: Sequence[float] | torch.Tensor
) -> dict:
    """For each timestep of a plan (its step ``i`` of ``N``), the units inside their window there,
    keyed by the timestep as the sampler passes it (float32)."""
    values = torch.as_tensor(timesteps).to(torch.float32).tolist()
    total = len(values)
    return {t: [c for c in controls if c.active_at(i, total)] for i, t in enumerate(values)}


class GuidedDenoiser:
    """``denoise(x, t)`` with classifier-free guidance, ControlNet units and T2I-Adapter units.

    ``timesteps``: the plan's, to decide once which units act at which step (their windows); the
    step of a call is found from its ``t``. None: every unit acts at every call (one evaluation).
    ``adapters``: their summed features for each step are made here, once. ``cond_y`` and
    ``uncond_y``: SDXL's vector y of each side (the pooled text embedding of its prompt and the size
    conditioning), for the UNet and the ControlNets; None for SD 1.x/2.x.
    """

    def __init__(
        self,
        unet: UNet,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        guidance_scale: float,
        controls: Sequence[ActiveControl],
        timesteps: Sequence[float] | torch.Tensor | None = None,
        only_mid_control: bool = False,
        adapters: Sequence[ActiveAdapter] = (),
        cond_y: torch.Tensor | None = None,
        uncond_y: torch.Tensor | None = None,
    ) -> None:
        """The models run in ``cond``'s dtype; ``x`` comes in (and the result goes out) in the
        sampler's dtype, and guidance combines the two sides in it."""
        self.unet = unet
        self.dtype = cond.dtype
        self.cond = cond
        # diffusers' rule (do_classifier_free_guidance): a scale of at most 1 runs the conditional
        # side alone, the batch of one. Exactly 1 is the same result; below 1 the original would
        # extrapolate away from the prompt, which no one asks for and costs a second pass.
        self.uncond = uncond if guidance_scale > 1.0 else None
        self.both = None if self.uncond is None else torch.cat([self.uncond, cond])  # [uncond; cond], built once
        if self.uncond is not None and (cond_y is None) != (uncond_y is None):
            raise ValueError("give SDXL's vector y for both sides of guidance (cond_y and uncond_y), or for neither")
        self.cond_y = cond_y
        self.uncond_y = uncond_y if self.uncond is not None else None
        self.both_y = None if self.uncond_y is None else torch.cat([self.uncond_y, cond_y])
        self.guidance_scale = guidance_scale
        self.controls = list(controls)
        self.schedule = None if timesteps is None else control_schedule(self.controls, timesteps)
        self.only_mid_control = only_mid_control
        self.adapters = list(adapters)
        self.adapter_features = self._adapter_schedule(timesteps)

    def _adapter_schedule(self, timesteps) -> dict | list[torch.Tensor] | None:
        """The summed adapter features of each step (None where no adapter acts), each distinct
        sum computed once; without timesteps, the sum of all of them."""
        if timesteps is None:
            return sum_adapter_features(self.adapters)
        sums: dict[tuple[int, ...], list[torch.Tensor] | None] = {}
        schedule = {}
        for key, active in control_schedule(self.adapters, timesteps).items():
            which = tuple(id(a) for a in active)
            if which not in sums:
                sums[which] = sum_adapter_features(active)
            schedule[key] = sums[which]
        return schedule

    def _step_key(self, t: torch.Tensor, schedule: dict) -> float:
        key = float(t.reshape(-1)[0])
        if key not in schedule:
            raise ValueError(f"the denoiser was called at timestep {key:g}, which is not a step of its plan")
        return key

    def active(self, t: torch.Tensor) -> list[ActiveControl]:
        """The units that act at timestep ``t`` (one value for the whole batch)."""
        if self.schedule is None:
            return self.controls
        return self.schedule[self._step_key(t, self.schedule)]

    def features(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """The adapters' summed features at timestep ``t`` (None: no adapter acts there)."""
        if not isinstance(self.adapter_features, dict):
            return self.adapter_features
        return self.adapter_features[self._step_key(t, self.adapter_features)]

    def _eps(self, x, t, context, y, controls: Sequence[ActiveControl], features=None) -> torch.Tensor:
        groups = [c.residuals(x, t, context, y) for c in controls]
        return self.unet(
            x,
            t,
            context,
            control=_sum_residuals(groups),
            only_mid_control=self.only_mid_control,
            adapter_features=features,
            y=y,
        )

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sampling_dtype = x.dtype
        x = x.to(self.dtype)
        active, features = self.active(t), self.features(t)
        if self.uncond is None:
            return self._eps(x, t, self.cond, self.cond_y, active, features).to(sampling_dtype)
        if not any(c.conditional_only for c in active):
            # Both sides share the same control: one batched call, [uncond; cond].
            both = self._eps(torch.cat([x, x]), torch.cat([t, t]), self.both, self.both_y, active, features)
            uncond_out, cond_out = both.chunk(2)
        else:
            # The adapters act on both sides (diffusers' adapter pipelines).
            cond_out = self._eps(x, t, self.cond, self.cond_y, active, features)
            shared = [c for c in active if not c.conditional_only]
            uncond_out = self._eps(x, t, self.uncond, self.uncond_y, shared, features)
        uncond_out, cond_out = uncond_out.to(sampling_dtype), cond_out.to(sampling_dtype)
        return uncond_out + self.guidance_scale * (cond_out - uncond_out)
