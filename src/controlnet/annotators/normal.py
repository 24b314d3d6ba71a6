"""Surface normals from a photograph: ``normal_bae`` (the AUTOMATIC1111 extension's name), the maps
``control_v11p_sd15_normalbae`` was trained on.

The steps follow ControlNet-v1-1-nightly annotator/normalbae/__init__.py and the extension's
``normal_bae`` (scripts/preprocessor/legacy/processor.py), which takes no parameter besides the
resolution: the RGB image in [0, 1] normalised with the ImageNet mean and deviation, the network's
finest prediction, its unit normal (x, y, z) mapped from [-1, 1] to [0, 1] and stored as RGB uint8
(truncated). The image arrives sized by `run_annotator` (sides multiples of 64); other sizes are
edge-padded to multiples of 64 and the map cropped back, as the extension's
``resize_image_with_pad`` / ``remove_pad`` do.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import runtime as policy
from .base import Annotator, AnnotatorFn, Runtime, pad_to_64
from .networks.normal_bae import NormalBae
from .weights import WeightFile, load_network

NORMAL_BAE_WEIGHTS = WeightFile(
    "scannet.pt",
    "the NormalBAE surface-normal network (EfficientNet-B5 encoder, uncertainty decoder; trained on ScanNet)",
    "https://huggingface.co/lllyasviel/Annotators",
    # The file keeps its weights under "model", every key prefixed "module." (DataParallel's).
    markers=(
        "encoder.original_model.conv_stem.weight",
        "decoder.out_conv_res8.weight",
        "decoder.out_conv_res1.6.weight",
    ),
)

# torchvision's ImageNet statistics, as the reference's transforms.Normalize takes them.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _as_input(rgb: np.ndarray, runtime: Runtime) -> torch.Tensor:
    """(H, W, 3) uint8 as the network's (1, 3, H, W) input: in [0, 1], ImageNet-normalised in float32
    (a channels-last view, as the reference's ``rearrange`` makes it), then in the runtime's dtype."""
    pixels = torch.from_numpy(rgb).to(runtime.device).float() / 255.0
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)
    mean = torch.tensor(_MEAN, device=pixels.device).view(-1, 1, 1)
    std = torch.tensor(_STD, device=pixels.device).view(-1, 1, 1)
    return ((pixels - mean) / std).to(policy.DTYPES[runtime.dtype])


def normal_map(network: NormalBae, rgb: np.ndarray, runtime: Runtime) -> np.ndarray:
    """The normal map (H, W, 3) uint8 of an RGB uint8 image whose sides are multiples of 8:
    ((n + 1) / 2) clipped to [0, 1], times 255, truncated (annotator/normalbae/__init__.py)."""
    with torch.inference_mode():
        normal = network(_as_input(rgb, runtime))[0, :3].float()
        policy.check_finite(normal, "the NormalBAE network's normals")
        normal = ((normal + 1) * 0.5).clip(0, 1)
        normal = normal.permute(1, 2, 0).cpu().numpy()
    return (normal * 255.0).clip(0, 255).astype(np.uint8)


def _normal_bae(runtime: Runtime) -> AnnotatorFn:
    network = load_network(NORMAL_BAE_WEIGHTS, runtime.folder, NormalBae, runtime.device, runtime.dtype)

    def normal_bae(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return np.ascontiguousarray(normal_map(network, pad_to_64(image), runtime)[:h, :w])

    return normal_bae


ANNOTATORS: tuple[Annotator, ...] = (
    Annotator(
        "normal_bae",
        "surface normals by NormalBAE (scannet.pt), as RGB (ControlNet 1.1 normalbae)",
        _normal_bae,
        weights=(NORMAL_BAE_WEIGHTS,),
    ),
)
