"""Random annotator weights with the real files' key layouts, for the family tests
(tests/test_annotators_<family>.py) and benchmarks/bench_annotators.py.

One function per file (or family of files) returns its tensors; ``file_object`` wraps them as the
real file holds them and ``write`` saves them under the real name. The values are scaled on
scikit-image's astronaut so that each network's map on a photograph is neither flat nor saturated:
both implementations then do their real work, and the exactness tests compare varied maps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch
from torch import nn

from .helpers import randomize
from .reference_annotators import aux_module

HED, PIDINET = "ControlNetHED.pth", "table5_pidinet.pth"
REALISTIC, COARSE, ANIME, MLSD = "sk_model.pth", "sk_model2.pth", "netG.pth", "mlsd_large_512_fp32.pth"
BODY, HAND, FACE = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
MIDAS, SCANNET = "dpt_hybrid-midas-501f0c75.pt", "scannet.pt"


def photo(name: str = "astronaut", width: int = 256, side: int = 256) -> np.ndarray:
    """A scikit-image photograph, its short side resized to ``side`` (INTER_AREA), the centre
    ``width`` columns kept: sides multiples of 64, as run_annotator sizes them."""
    rgb = getattr(skimage.data, name)()
    h, w = rgb.shape[:2]
    scaled = cv2.resize(rgb, (round(w * side / h), side), interpolation=cv2.INTER_AREA)
    left = (scaled.shape[1] - width) // 2
    return np.ascontiguousarray(scaled[:, left : left + width])


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).permute(2, 0, 1)[None]


def _standardise(conv: nn.Module, output: torch.Tensor, channels: slice, mean: float, std: float) -> None:
    """Rescale ``conv``'s output channels so that on ``output`` (its output before) they have this
    mean and standard deviation."""
    with torch.no_grad():
        for c in range(conv.weight.shape[0])[channels]:
            scale = std / output[0, c].std()
            conv.weight[c].mul_(scale)
            conv.bias[c].sub_(output[0, c].mean()).mul_(scale).add_(mean)


def _state(net: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.clone() for k, v in net.state_dict().items()}


def _shapes(make: Callable[[], nn.Module]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """A network's state dict keys, shapes and dtypes, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: (v.shape, v.dtype) for k, v in make().state_dict().items()}


# -- soft edges ------------------------------------------------------------------------------------


def hed() -> dict[str, torch.Tensor]:
    """ControlNetHED_Apache2's keys and shapes, random: He-normal convolutions (activations keep
    their scale through 13 ReLU layers), a typical mean pixel as `norm`, and each side projection
    rescaled so that its map on the astronaut has mean 0 and standard deviation 3: the sigmoid of
    the mean of the five maps then spans the whole 0..255 range without saturating."""
    torch.manual_seed(0)
    net = aux_module("hed").ControlNetHED_Apache2()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 1.0)
        net.norm.copy_(torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1))
        for k, side in enumerate(net(_chw(photo())), start=1):
            projection = getattr(net, f"block{k}").projection
            scale = 3.0 / side.std()
            projection.weight.mul_(scale)
            projection.bias.sub_(side.mean()).mul_(scale)
    return _state(net)


def pidi_model():
    """controlnet_aux pidi/model.py, its package's __init__ (PidiNetDetector) imported first: the
    loader enters a package bare when a submodule is asked for before it."""
    aux_module("pidi")
    return aux_module("pidi.model")


def pidinet() -> dict[str, torch.Tensor]:
    """pidinet()'s keys and shapes (carv4, 60 channels, dil 24, attention) with its own random
    initialisation, each side map's reduction rescaled to mean 0 and deviation 1 on the astronaut,
    and random fusion weights: the fused edge probability spans 0..1. Keys as the file has them,
    with DataParallel's "module." prefix."""
    torch.manual_seed(1)
    net = pidi_model().pidinet().eval()
    sides: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, i, out: sides.append(out)) for r in net.conv_reduces]
    with torch.no_grad():
        net(_chw(photo()[:, :, ::-1]) / 255.0)
        for hook in hooks:
            hook.remove()
        for reduce, side in zip(net.conv_reduces, sides, strict=True):
            scale = 1.0 / side.std()
            reduce.conv.weight.mul_(scale)
            reduce.conv.bias.sub_(side.mean()).mul_(scale)
        net.classifier.weight.normal_(0.0, 1.5)
        net.classifier.bias.zero_()
    return _state(net, "module.")


# -- line art and straight lines ---------------------------------------------------------------------


def lineart(seed: int) -> dict[str, torch.Tensor]:
    """informative-drawings' Generator(3, 1, 3) as controlnet_aux builds it, random (1/sqrt(fan-in)
    weights; its InstanceNorms keep every activation in scale), the last convolution rescaled so that
    its logits on the astronaut have mean 0 and deviation 2: the sigmoid spans most of 0..255.
    Seed 0 for sk_model.pth (realistic), 1 for sk_model2.pth (coarse)."""
    net = randomize(aux_module("lineart").Generator(3, 1, 3), seed).eval()
    with torch.no_grad():
        features = net.model3(net.model2(net.model1(net.model0(_chw(photo() / 255.0)))))
        _standardise(net.model4[1], net.model4[1](net.model4[0](features)), slice(None), 0.0, 2.0)
    return _state(net)


def anime_net() -> nn.Module:
    """pix2pix's UnetGenerator(3, 1, 8, 64) with affine-free InstanceNorm, as controlnet_aux builds it."""
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return aux_module("lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def lineart_anime() -> dict[str, torch.Tensor]:
    """``anime_net()``, random, its last transposed convolution scaled by 0.3 (the tanh then
    saturates on few pixels). Keys with DataParallel's "module." prefix, which the references strip."""
    net = randomize(anime_net(), 2).eval()
    with torch.no_grad():
        net.model.model[3].weight.mul_(0.3)
    return _state(net, "module.")


def mlsd_module(submodule: str = ""):
    """controlnet_aux's mlsd package (its __init__, MLSDdetector) or one of its modules, the package
    imported first: the loader enters a package bare when a submodule is asked for before it."""
    package = aux_module("mlsd")
    return aux_module(f"mlsd.{submodule}") if submodule else package


def mlsd() -> dict[str, torch.Tensor]:
    """MobileV2_MLSD_Large, random, with BatchNorm statistics near 0 and 1; the head's output
    channels rescaled on the astronaut: centre logits of mean -1 and deviation 1.5 (many centres
    above the 0.1 score), displacements of deviation 8 pixels. Saved without BatchNorm's
    num_batches_tracked (the file's torch version is unknown; both loaders fill it in)."""
    net = randomize(mlsd_module("models.mbv2_mlsd_large").MobileV2_MLSD_Large(), 3).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        features: list[torch.Tensor] = []
        hook = net.block23.conv3.register_forward_hook(lambda m, i, out: features.append(out))
        rgb = photo().astype(np.float32)
        net(_chw(np.concatenate([rgb, np.ones_like(rgb[:, :, :1])], axis=2) / 127.5 - 1.0))
        hook.remove()
        _standardise(net.block23.conv3, features[0], slice(7, 8), -1.0, 1.5)
        _standardise(net.block23.conv3, features[0], slice(8, 12), 0.0, 8.0)
    return {k: v for k, v in _state(net).items() if not k.endswith("num_batches_tracked")}


# -- OpenPose ----------------------------------------------------------------------------------------

_POOL = 1 << 22


def openpose(make: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """The network's keys and shapes, random: He-normal convolutions (activations keep their scale
    through the stem and six stages), biases small. The values are taken at random places of one
    pool of 8M normal samples (drawing the 52M values of the body network apart would double the
    time the tests take); no tensor of these networks holds more than 4M."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * _POOL, generator=generator)
    state = {}
    for key, (shape, _) in _shapes(make).items():
        count, start = math.prod(shape), int(torch.randint(_POOL, (1,), generator=generator))
        assert count <= _POOL
        values = pool[start : start + count]
        scale = (2.0 / math.prod(shape[1:])) ** 0.5 if key.endswith("weight") else 0.01
        state[key] = (values * scale).reshape(shape)
    return state


# One person standing, arms out, facing the camera: (x, y) as fractions of a square picture, in the
# order of the 18 COCO keypoints (nose, neck, right and left shoulder, elbow and wrist, right and left
# hip, knee and ankle, right and left eye and ear). Both arms whole: the hand network looks at two
# boxes; nose, eyes and ears: the face network at one, as on a photograph of one person.
ONE_PERSON = (
    (0.50, 0.20), (0.50, 0.32), (0.30, 0.34), (0.20, 0.50), (0.15, 0.66), (0.70, 0.34), (0.80, 0.50),
    (0.85, 0.66), (0.38, 0.62), (0.36, 0.78), (0.35, 0.93), (0.62, 0.62), (0.64, 0.78), (0.65, 0.93),
    (0.42, 0.14), (0.58, 0.14), (0.34, 0.17), (0.66, 0.17),
)  # fmt: skip


def openpose_body_of_one_person() -> dict[str, torch.Tensor]:
    """The body network's ``openpose`` weights (seed 0) with its last two 1x1 convolutions set so
    that on the astronaut it finds the one person of ONE_PERSON, whole (about one candidate per
    keypoint): for timing the whole detection, where random heatmaps give either thousands of
    candidates or no arm and no face whole, so the hand and face networks would never run.

    Heatmaps (Mconv7_stage6_L2): each keypoint's channel is the ridge regression of the last
    features (128 channels on the 23 x 23 grid of the 184-row input) onto a bump of one cell at the
    keypoint, shifted so that 0.1, the peak threshold, lies halfway between the fit's value there and
    its largest beyond two cells. PAFs (Mconv7_stage6_L1): constant, each limb's two channels the
    unit vector along that limb, so that every limb of the person connects."""
    from controlnet.annotators.networks.openpose import BodyPoseNet
    from controlnet.annotators.pose.body import LIMBS, PAF_CHANNELS, PEAK_THRESHOLD, body_maps

    state = openpose(BodyPoseNet, 0)
    with torch.device("meta"):
        net = BodyPoseNet()
    net = net.to_empty(device="cpu").eval()
    net.load_state_dict(state)
    taken: list[torch.Tensor] = []
    hook = net.Mconv7_stage6_L2.register_forward_pre_hook(lambda module, args: taken.append(args[0]))
    body_maps(net, np.ascontiguousarray(photo(width=512, side=512)[:, :, ::-1]))
    hook.remove()
    features = taken[0][0].double()  # (128, 23, 23)
    channels, rows, cols = features.shape
    design = torch.cat([features.reshape(channels, -1).T, torch.ones(rows * cols, 1, dtype=torch.float64)], 1)
    y, x = torch.meshgrid(torch.arange(rows) + 0.5, torch.arange(cols) + 0.5, indexing="ij")
    y, x = y.double(), x.double()
    points = torch.tensor(ONE_PERSON, dtype=torch.float64) * torch.tensor([cols, rows], dtype=torch.float64)
    distance2 = torch.stack([(x - px) ** 2 + (y - py) ** 2 for px, py in points], 2)  # (rows, cols, 18)
    bumps = torch.exp(-distance2 / 2).reshape(-1, len(points))
    # Ridge, not least squares: the dead ReLU channels make the plain problem singular, and its
    # solution then depends on the BLAS's summation order.
    gram = design.T @ design
    solution = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(channels + 1), design.T @ bumps)
    fit = (design @ solution).reshape(rows, cols, -1)
    peak = torch.stack([fit[int(py), int(px), k] for k, (px, py) in enumerate(points)])
    beyond = torch.where(distance2 > 4, fit, torch.tensor(-torch.inf, dtype=torch.float64)).amax(dim=(0, 1))
    heatmaps_weight, heatmaps_bias = state["Mconv7_stage6_L2.weight"], state["Mconv7_stage6_L2.bias"]
    heatmaps_weight[:18, :, 0, 0] = solution[:channels].T.float()
    heatmaps_bias[:18] = (solution[channels] - (peak + beyond) / 2 + PEAK_THRESHOLD).float()
    heatmaps_weight[18], heatmaps_bias[18] = 0.0, 0.0  # the background channel, never read
    state["Mconv7_stage6_L1.weight"].zero_()
    pixels = np.array(ONE_PERSON)
    for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS, strict=True):
        direction = (pixels[b] - pixels[a]) / np.linalg.norm(pixels[b] - pixels[a])
        state["Mconv7_stage6_L1.bias"][cx], state["Mconv7_stage6_L1.bias"][cy] = (float(v) for v in direction)
    return state


def _openpose_file(name: str) -> dict[str, torch.Tensor]:
    from controlnet.annotators.networks.openpose import BodyPoseNet, FaceNet, HandPoseNet

    make, seed = {BODY: (BodyPoseNet, 0), HAND: (HandPoseNet, 1), FACE: (FaceNet, 2)}[name]
    return openpose(make, seed)


# -- depth -------------------------------------------------------------------------------------------


def _transformer(make: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """Random weights that keep activations in range: every tensor normal with std 1/sqrt(fan-in)
    (LayerNorm/GroupNorm weights near 1, biases small, position embeddings and tokens 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, _) in _shapes(make).items():
        t = torch.randn(shape, generator=generator)
        if key.endswith("gamma") or (len(shape) == 1 and key.endswith("weight")):
            t = 1.0 + 0.1 * t
        elif len(shape) == 1:
            t = 0.05 * t
        elif "pos_embed" in key or "token" in key:
            t = 0.5 * t
        else:
            t = t / math.sqrt(max(1, math.prod(shape[1:])))
        state[key] = t.contiguous()
    return state


def depth_midas() -> dict[str, torch.Tensor]:
    """MiDaS v3 DPT-Hybrid, random (seed 0), the last conv's bias positive so the final ReLU leaves
    a varied, non-zero map."""
    from controlnet.annotators.networks.midas import DPTHybridMiDaS

    state = _transformer(DPTHybridMiDaS, 0)
    state["scratch.output_conv.4.bias"] = torch.tensor([0.5])
    return state


def depth_anything_v2(encoder: str) -> dict[str, torch.Tensor]:
    """Depth Anything V2 of ``encoder`` ("vits", "vitb", "vitl"), random (seed 1), the last conv's
    bias positive."""
    from controlnet.annotators.networks.depth_anything_v2 import DepthAnythingV2

    state = _transformer(lambda: DepthAnythingV2(encoder), 1)
    state["depth_head.scratch.output_conv2.2.bias"] = torch.tensor([0.5])
    return state


# -- normals -----------------------------------------------------------------------------------------


def normal_bae(seed: int = 0) -> dict[str, torch.Tensor]:
    """NormalBAE's state dict (its own keys, as NNET loads them) with random values of a scale that
    keeps activations in range: He-like convolutions, BatchNorm statistics near identity. scannet.pt
    holds them under "model", prefixed "module." (``file_object``)."""
    from controlnet.annotators.networks.normal_bae import NormalBae

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, (shape, dtype) in _shapes(NormalBae).items():
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.zeros(shape, dtype=dtype)
        elif key.endswith("running_var"):
            weights[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("running_mean"):
            weights[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:  # BatchNorm scales near 1, every bias near 0
            scale = key.endswith(".weight") and (".bn" in key or "_net.1." in key or "_net.4." in key)
            weights[key] = float(scale) + 0.1 * torch.randn(shape, generator=generator)
        else:
            weights[key] = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    return weights


# -- the files ---------------------------------------------------------------------------------------

# file name -> its tensors
TENSORS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    HED: hed,
    PIDINET: pidinet,
    REALISTIC: lambda: lineart(0),
    COARSE: lambda: lineart(1),
    ANIME: lineart_anime,
    MLSD: mlsd,
    BODY: lambda: _openpose_file(BODY),
    HAND: lambda: _openpose_file(HAND),
    FACE: lambda: _openpose_file(FACE),
    MIDAS: depth_midas,
    **{f"depth_anything_v2_{e}.pth": functools.partial(depth_anything_v2, e) for e in ("vits", "vitb", "vitl")},
    SCANNET: normal_bae,
}


def file_object(name: str, tensors: dict[str, torch.Tensor]) -> object:
    """What the real file ``name`` holds around its tensors: table5_pidinet.pth the PiDiNet authors'
    checkpoint ({"state_dict": ...}, keys already "module."); scannet.pt {"model": {"module.<key>":
    ...}}; every other file a plain state dict."""
    if name == PIDINET:
        return {"epoch": 14, "state_dict": tensors}
    if name == SCANNET:
        return {"model": {f"module.{k}": v for k, v in tensors.items()}}
    return tensors


def write(folder: Path, name: str, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """The file ``name`` in ``folder``, in its real layout: ``tensors``, or else ``TENSORS[name]()``."""
    path = folder / name
    torch.save(file_object(name, TENSORS[name]() if tensors is None else tensors), path)
    return path


def write_files(folder: Path, tensors: Mapping[str, dict[str, torch.Tensor]]) -> Path:
    """Each file of ``tensors`` (file name -> its tensors) written into ``folder``, which is returned."""
    for name, file_tensors in tensors.items():
        write(folder, name, file_tensors)
    return folder
