"""Shared test helpers: fast seeded random weights for full-size models, error measures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def randomize(module: ModuleT, seed: int, zero_convs_too: bool = True) -> ModuleT:
    """Fill every parameter from a seeded generator, far faster than the default inits at full size.

    Weights get std 1/sqrt(fan_in) so activations stay O(1) through a deep network (and softmaxes
    are far from uniform); norm scales are near 1 and biases small but non-zero, so a swapped
    weight/bias or scale/shift shows.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return module


def random_module(factory: Callable[[], ModuleT], seed: int) -> ModuleT:
    """Build on the meta device (no time spent on default inits), then fill with seeded values."""
    with torch.device("meta"):
        module = factory()
    return randomize(module.to_empty(device="cpu"), seed).eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_background(folder, *arguments: str, timeout: float = 180):
    """Run `controlnet serve` on a free port in a subprocess; yield its URL once it answers."""
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    port = _free_port()
    log = folder / "serve.log"
    command = [sys.executable, "-m", "controlnet", "serve", "--port", str(port), *arguments]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/models", timeout=5):
                    break
            except urllib.error.HTTPError:  # an answer all the same (401 when it wants a password)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"controlnet serve did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # busy past the grace period (a slow CI machine): not a failure here
            process.kill()
            process.wait(timeout=30)


# The original's DDIM (docs/reference.md, "Sampling") in diffusers' terms: its schedule, "leading"
# timesteps offset by 1, the last step to alpha_cumprod[0], no clipping.
DIFFUSERS_ORIGINAL_DDIM = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def three_level_unet(num_res_blocks: int):
    """A small UNet with SD 1.5's three kinds of down block: attention at the first two levels only,
    so diffusers builds CrossAttnDownBlock2D, CrossAttnDownBlock2D and a DownBlock2D."""
    from controlnet.config import UNetConfig

    return UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=num_res_blocks,
        attention_resolutions=(1, 2),
        num_heads=None,
        num_head_channels=16,
        context_dim=64,
        use_linear_in_transformer=True,
        norm_groups=8,
    )


def write_tiny_adapter(path, seed: int = 0, channels: tuple[int, ...] | None = None):
    """A full T2I-Adapter with seeded random weights, saved as TencentARC's ``.pth`` files are (a
    state dict under their key names: ours are theirs). Its widths fit the tiny base unless
    ``channels`` says otherwise (an adapter of another family)."""
    from controlnet.config import TINY, T2IAdapterConfig
    from controlnet.models.t2i_adapter import build_adapter

    config = T2IAdapterConfig(channels=channels or TINY.unet.level_channels, num_res_blocks=1)
    torch.save(random_module(lambda: build_adapter(config), seed).state_dict(), path)
    return path
