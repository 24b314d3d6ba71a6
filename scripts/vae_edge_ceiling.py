"""The edge F1 a model's VAE allows: Canny edge F1 of each held-out scene passed through the VAE
(encode, decode) against the scene's own edges. A generated image cannot do better than its VAE's
decoder draws, so this is the ceiling to read `controlnet eval`'s edge F1 against (docs/model-card.md).

    .venv/bin/python scripts/vae_edge_ceiling.py --data ~/.cache/controlnet-shipped/held-out --count 100

A VAE still training is scored from its checkpoint (the VAE's weights in the run's state.pt) and the
preset it is a VAE of:

    .venv/bin/python scripts/vae_edge_ceiling.py --data ~/.cache/controlnet-world/held-out \
        --checkpoint ~/.cache/controlnet-world/vae/checkpoints/step-00001000 --preset world --count 40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from controlnet import shipped
from controlnet.config import preset
from controlnet.datasets.folders import read_records
from controlnet.evaluation import edge_f1
from controlnet.imaging.images import load_image
from controlnet.loading import load_base
from controlnet.models.stable_diffusion import StableDiffusion
from controlnet.train.config import STATE_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a dataset folder (prompt.json)")
    parser.add_argument("--base", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a vae task's checkpoint folder (step-N)")
    parser.add_argument("--preset", default=None, help="with --checkpoint: the preset it trains the VAE of")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    if args.checkpoint is not None:
        model = StableDiffusion(preset(args.preset))
        state = torch.load(args.checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        prefix = "model.vae."  # the vae objective's name for the VAE's parameters
        vae = {k.removeprefix(prefix): v for k, v in state["trainable"].items() if k.startswith(prefix)}
        model.vae.load_state_dict(vae)
        model = model.eval()
    else:
        model = load_base(args.base or shipped.base_path()).float().eval()
    scores = []
    with torch.no_grad():
        for record in read_records(args.data)[: args.count]:
            target, condition = load_image(record.target), load_image(record.source)
            pixels = torch.from_numpy(target).float().div(127.5).sub(1).permute(2, 0, 1)[None]
            decoded = model.vae.decode(model.vae.encode(pixels).mean)[0]
            image = ((decoded.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            scores.append(edge_f1(image, condition).f1)
    print(f"VAE reconstruction edge F1 over {len(scores)} scenes: {np.mean(scores):.3f} (min {np.min(scores):.3f})")


if __name__ == "__main__":
    main()
