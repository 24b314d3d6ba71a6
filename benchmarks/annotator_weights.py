"""The pieces of bench_annotators.py: random weights with the real files' key layouts, written under
the real file names, and controlnet_aux's detectors on the same files.

- ``aux_module``: controlnet_aux's modules one by one. Its package ``__init__`` imports every
  annotator and torchvision, which does not install beside this project's torch; so its packages are
  entered without their ``__init__`` and, while a module is imported, a minimal
  ``torchvision.transforms`` stands in when torchvision is absent (as tests/reference_annotators.py).
- ``write_random``: one weight file, random, in the original's layout. The values are scaled as the
  annotator tests scale them (tests/test_annotators_*.py), so that each network's map on a photo is
  neither flat nor saturated: both implementations then do their real work (M-LSD decodes and draws
  segments; OpenPose's heatmaps are shifted so that each keypoint has a few peaks, see
  ``_random_body``).
- ``aux_detector``: controlnet_aux's detector of an annotator, read from a folder. MiDaS in
  controlnet_aux builds its network with timm, which must not be installed here: its detector's own
  pre- and post-processing is used around transformers' DPT-Hybrid, loaded from the same file
  through a key map (as tests/test_annotators_depth.py).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

import common

# -- controlnet_aux, module by module ---------------------------------------------------------------


def aux_available() -> bool:
    return importlib.util.find_spec("controlnet_aux") is not None


def aux_module(name: str) -> types.ModuleType:
    """``controlnet_aux.<name>`` (e.g. "hed", "open_pose.body"), its parent packages entered without
    their ``__init__`` unless the module is itself a package's ``__init__``."""
    spec = importlib.util.find_spec("controlnet_aux")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("controlnet_aux is not installed (make install-dev installs it)")
    root = Path(next(iter(spec.submodule_search_locations)))
    full = f"controlnet_aux.{name}"
    if full in sys.modules:
        return sys.modules[full]
    parts = full.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            package_spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
            package_spec.submodule_search_locations = [str(root.joinpath(*parts[1:depth]))]
            sys.modules[package] = importlib.util.module_from_spec(package_spec)
    with _stand_ins():
        return importlib.import_module(full)


class _stand_ins:
    """While a controlnet_aux module is imported: a minimal ``torchvision.transforms`` (Normalize and
    Compose, the only ones the timed code paths call) if torchvision is absent, and an empty ``timm``
    (controlnet_aux.midas imports it at the top, and calls it only to build a network, never here)."""

    def __enter__(self) -> None:
        self.added = []
        if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
            vision, transforms = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
            transforms.Compose, transforms.Normalize = _Compose, _Normalize
            transforms.ToTensor = transforms.ToPILImage = _Unused
            vision.transforms = transforms
            self.added += [("torchvision", vision), ("torchvision.transforms", transforms)]
        if importlib.util.find_spec("timm") is None and "timm" not in sys.modules:
            self.added.append(("timm", types.ModuleType("timm")))
        sys.modules.update(self.added)

    def __exit__(self, *exc: object) -> None:
        for name, _ in self.added:
            sys.modules.pop(name, None)


class _Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x


class _Normalize:
    """torchvision.transforms.Normalize: (x - mean) / std per channel of a (..., C, H, W) tensor."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


class _Unused:
    def __call__(self, *args, **kwargs):
        raise NotImplementedError("not used by the timed code paths")


# -- random weights with the real layouts ------------------------------------------------------------


def _photo(size: int = 256) -> np.ndarray:
    """The astronaut at ``size`` squared: the picture the random weights are scaled on."""
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


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
    return {f"{prefix}{k}": v.detach().clone() for k, v in net.state_dict().items()}


def _random_hed() -> dict[str, torch.Tensor]:
    """ControlNetHED_Apache2, He-normal, each side projection rescaled to mean 0 and deviation 3 on
    the photo (the sigmoid of the five maps' mean spans 0..255 without saturating)."""
    torch.manual_seed(0)
    net = aux_module("hed").ControlNetHED_Apache2()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5 if name.endswith("weight") else 1.0)
        net.norm.copy_(torch.tensor([123.0, 117.0, 104.0]).view(1, 3, 1, 1))
        for k, side in enumerate(net(_chw(_photo())), start=1):
            projection = getattr(net, f"block{k}").projection
            scale = 3.0 / side.std()
            projection.weight.mul_(scale)
            projection.bias.sub_(side.mean()).mul_(scale)
    return _state(net)


def _random_pidinet() -> dict[str, torch.Tensor]:
    """pidinet() (carv4, 60 channels, dil 24, attention), its own initialisation, each side map's
    reduction rescaled to mean 0 and deviation 1, random fusion; keys prefixed "module."."""
    torch.manual_seed(1)
    aux_module("pidi")
    net = aux_module("pidi.model").pidinet().eval()
    sides: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, i, out: sides.append(out)) for r in net.conv_reduces]
    with torch.no_grad():
        net(_chw(_photo()[:, :, ::-1]) / 255.0)
        for hook in hooks:
            hook.remove()
        for reduce, side in zip(net.conv_reduces, sides, strict=True):
            scale = 1.0 / side.std()
            reduce.conv.weight.mul_(scale)
            reduce.conv.bias.sub_(side.mean()).mul_(scale)
        net.classifier.weight.normal_(0.0, 1.5)
        net.classifier.bias.zero_()
    return _state(net, "module.")


def _random_lineart(seed: int) -> dict[str, torch.Tensor]:
    """informative-drawings' Generator(3, 1, 3), 1/sqrt(fan-in), the last convolution's logits
    rescaled to mean 0 and deviation 2 on the photo."""
    net = common.randomize(aux_module("lineart").Generator(3, 1, 3), seed)
    with torch.no_grad():
        features = net.model3(net.model2(net.model1(net.model0(_chw(_photo() / 255.0)))))
        _standardise(net.model4[1], net.model4[1](net.model4[0](features)), slice(None), 0.0, 2.0)
    return _state(net)


def _anime_net() -> nn.Module:
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return aux_module("lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def _random_anime() -> dict[str, torch.Tensor]:
    """pix2pix's UnetGenerator(3, 1, 8, 64), its last transposed convolution scaled by 0.3 (the tanh
    saturates on few pixels); keys prefixed "module."."""
    net = common.randomize(_anime_net(), 2)
    with torch.no_grad():
        net.model.model[3].weight.mul_(0.3)
    return _state(net, "module.")


def _random_mlsd() -> dict[str, torch.Tensor]:
    """MobileV2_MLSD_Large, BatchNorm statistics near 0 and 1, the head rescaled on the photo: centre
    logits of mean -1 and deviation 1.5 (many centres above the 0.1 score), displacements of
    deviation 8 pixels."""
    aux_module("mlsd")
    net = common.randomize(aux_module("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large(), 3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        features: list[torch.Tensor] = []
        hook = net.block23.conv3.register_forward_hook(lambda m, i, out: features.append(out))
        rgb = _photo().astype(np.float32)
        net(_chw(np.concatenate([rgb, np.ones_like(rgb[:, :, :1])], axis=2) / 127.5 - 1.0))
        hook.remove()
        _standardise(net.block23.conv3, features[0], slice(7, 8), -1.0, 1.5)
        _standardise(net.block23.conv3, features[0], slice(8, 12), 0.0, 8.0)
    return {k: v for k, v in _state(net).items() if not k.endswith("num_batches_tracked")}


def _shapes(make: Callable[[], nn.Module]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """A network's state dict keys, shapes and dtypes, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: (v.shape, v.dtype) for k, v in make().state_dict().items()}


def _random_body() -> dict[str, torch.Tensor]:
    """OpenPose's body network with the file's flat keys, He-normal (biases 0.01). Random heatmaps
    would give thousands of keypoint candidates, and the reference's grouping loop over every pair
    of them would take minutes; so each of the 18 keypoint heatmaps is shifted (its last
    convolution's bias) until about 0.5 % of the photo's pixels exceed the 0.1 peak threshold: a
    few peaks per keypoint, as a photo of a person gives."""
    from controlnet.annotators.networks.openpose import BodyPoseNet
    from controlnet.annotators.pose.body import body_maps

    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, (shape, _) in _shapes(BodyPoseNet).items():
        scale = (2.0 / math.prod(shape[1:])) ** 0.5 if key.endswith("weight") else 0.01
        state[key] = torch.randn(shape, generator=generator) * scale
    with torch.device("meta"):
        net = BodyPoseNet()
    net = net.to_empty(device="cpu").eval()
    bias = state["Mconv7_stage6_L2.bias"]
    bgr = np.ascontiguousarray(_photo(512)[:, :, ::-1])
    for _ in range(2):  # the last heatmaps pass a ReLU: a second pass corrects where it clipped
        net.load_state_dict(state)
        heatmaps, _ = body_maps(net, bgr)
        for part in range(18):
            bias[part] += 0.1 - np.percentile(heatmaps[:, :, part], 99.5)
    return state


def _randomise(make: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """Random values that keep a transformer's activations in range (as tests/test_annotators_depth.py):
    1/sqrt(fan-in), norm scales near 1, small biases, position embeddings and tokens 0.5."""
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
        state[key] = t
    return state


def _random_midas() -> dict[str, torch.Tensor]:
    from controlnet.annotators.networks.midas import DPTHybridMiDaS

    state = _randomise(DPTHybridMiDaS, 0)
    state["scratch.output_conv.4.bias"] = torch.tensor([0.5])  # the last ReLU leaves a varied map
    return state


def _random_da2(encoder: str) -> dict[str, torch.Tensor]:
    from controlnet.annotators.networks.depth_anything_v2 import DepthAnythingV2

    state = _randomise(lambda: DepthAnythingV2(encoder), 1)
    state["depth_head.scratch.output_conv2.2.bias"] = torch.tensor([0.5])
    return state


def _random_normal_bae() -> dict[str, dict[str, torch.Tensor]]:
    """NormalBAE, He-like convolutions, BatchNorm statistics near identity; saved as scannet.pt is:
    {"model": {"module.<key>": ...}}."""
    from controlnet.annotators.networks.normal_bae import NormalBae

    generator = torch.Generator().manual_seed(0)
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
    return {"model": {f"module.{k}": v for k, v in weights.items()}}


# file name -> what the file holds (its object as torch.save writes it)
WRITERS: dict[str, Callable[[], object]] = {
    "ControlNetHED.pth": _random_hed,
    "table5_pidinet.pth": lambda: {"epoch": 14, "state_dict": _random_pidinet()},
    "sk_model.pth": lambda: _random_lineart(0),
    "sk_model2.pth": lambda: _random_lineart(1),
    "netG.pth": _random_anime,
    "mlsd_large_512_fp32.pth": _random_mlsd,
    "body_pose_model.pth": _random_body,
    "dpt_hybrid-midas-501f0c75.pt": _random_midas,
    "depth_anything_v2_vits.pth": lambda: _random_da2("vits"),
    "depth_anything_v2_vitb.pth": lambda: _random_da2("vitb"),
    "depth_anything_v2_vitl.pth": lambda: _random_da2("vitl"),
    "scannet.pt": _random_normal_bae,
}


def write_random(name: str, folder: Path) -> Path:
    """The file ``name``, random in its real layout, written into ``folder`` (once)."""
    path = folder / name
    if not path.exists():
        torch.save(WRITERS[name](), path)
    return path


# -- controlnet_aux's detectors on the same files ----------------------------------------------------


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _lineart(folder: Path, file: str):
    """LineartDetector with the one generator this annotator uses (from_pretrained reads both files
    into two Generator(3, 1, 3); the same module fills both places here)."""
    module = aux_module("lineart")
    model = module.Generator(3, 1, 3)
    model.load_state_dict(_load(folder / file))
    model.eval()
    return module.LineartDetector(model, model)


def _openpose(folder: Path):
    """OpenposeDetector with its body estimator only (from_pretrained also reads the hand and face
    files, which the body-only annotator never runs)."""
    package = aux_module("open_pose")
    return package.OpenposeDetector(aux_module("open_pose.body").Body(str(folder / "body_pose_model.pth")))


class _Predicts(nn.Module):
    """transformers' model as MidasDetector calls its network: (1, 3, H, W) -> (1, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).predicted_depth


def _midas(folder: Path):
    """controlnet_aux's MidasDetector around transformers' DPT-Hybrid loaded from the same file."""
    return aux_module("midas").MidasDetector(
        _Predicts(_transformers_midas(_load(folder / "dpt_hybrid-midas-501f0c75.pt")))
    )


def aux_detector(name: str, folder: Path) -> Callable[..., np.ndarray]:
    """controlnet_aux's detector of annotator ``name`` on the files in ``folder``."""
    builders: dict[str, Callable[[], Callable[..., np.ndarray]]] = {
        "softedge_hed": lambda: aux_module("hed").HEDdetector.from_pretrained(str(folder)),
        "softedge_pidinet": lambda: aux_module("pidi").PidiNetDetector.from_pretrained(str(folder)),
        "lineart_realistic": lambda: _lineart(folder, "sk_model.pth"),
        "lineart_coarse": lambda: functools.partial(_lineart(folder, "sk_model2.pth"), coarse=True),
        "lineart_anime": lambda: aux_module("lineart_anime").LineartAnimeDetector.from_pretrained(str(folder)),
        "mlsd": lambda: aux_module("mlsd").MLSDdetector.from_pretrained(str(folder)),
        "openpose": lambda: functools.partial(
            _openpose(folder), include_body=True, include_hand=False, include_face=False
        ),
        "depth_midas": lambda: _midas(folder),
        "normal_bae": lambda: aux_module("normalbae").NormalBaeDetector.from_pretrained(str(folder)),
    }
    return builders[name]()


# -- MiDaS: the original file's keys -> transformers' DPT-Hybrid (as tests/test_annotators_depth.py) --

_VIT_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense"}


def _fusion(rest: str) -> str:
    # refinenetN.resConfUnitK.convJ -> residual_layerK.convolutionJ; out_conv -> projection
    rest = rest.replace("resConfUnit", "residual_layer").replace("out_conv", "projection")
    return rest.replace(".conv1", ".convolution1").replace(".conv2", ".convolution2")


def _decoder_key(key: str) -> str:
    if key.startswith("scratch.layer"):
        return f"neck.convs.{int(key[len('scratch.layer')]) - 1}.{key.rsplit('.', 1)[1]}"
    level = int(key[len("scratch.refinenet")])
    return f"neck.fusion_stage.layers.{4 - level}.{_fusion(key.split('.', 2)[2])}"


def _midas_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    vit = "pretrained.model."
    for key, value in state.items():
        if key.startswith(vit + "head."):
            continue  # the ImageNet classifier MiDaS never runs
        if key.startswith(vit + "blocks."):
            _, _, _, n, rest = key.split(".", 4)
            prefix = f"dpt.encoder.layer.{n}"
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                names = (f"{prefix}.attention.attention.{q}.{kind}" for q in ("query", "key", "value"))
                out.update(zip(names, value.chunk(3, dim=0), strict=True))
                continue
            name, kind = rest.rsplit(".", 1)
            name = _VIT_BLOCK.get(name, {"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}.get(name))
            out[f"{prefix}.{name}.{kind}"] = value
        elif key.startswith(vit + "patch_embed.backbone."):
            rest = key[len(vit + "patch_embed.backbone.") :]
            if rest.startswith("stem."):
                rest = rest.replace("stem.conv", "embedder.convolution").replace("stem.norm", "embedder.norm")
                out[f"dpt.embeddings.backbone.bit.{rest}"] = value
            else:
                out[f"dpt.embeddings.backbone.bit.encoder.{rest.replace('.blocks.', '.layers.')}"] = value
        elif key.startswith(vit):
            rest = key[len(vit) :]
            simple = {"cls_token": "dpt.embeddings.cls_token", "pos_embed": "dpt.embeddings.position_embeddings"}
            if rest in simple:
                out[simple[rest]] = value
            elif rest.startswith("patch_embed.proj."):
                out[f"dpt.embeddings.projection.{rest.rsplit('.', 1)[1]}"] = value
            else:  # the final norm
                out[f"dpt.layernorm.{rest.rsplit('.', 1)[1]}"] = value
        elif key.startswith("pretrained.act_postprocess"):
            level = int(key[len("pretrained.act_postprocess")]) - 1
            index, kind = key.split(".")[2], key.rsplit(".", 1)[1]
            if index == "0":
                out[f"neck.reassemble_stage.readout_projects.{level}.0.{kind}"] = value
            else:
                part = "projection" if index == "3" else "resize"
                out[f"neck.reassemble_stage.layers.{level}.{part}.{kind}"] = value
        elif key.startswith("scratch.output_conv."):
            out["head.head." + key[len("scratch.output_conv.") :]] = value
        else:
            out[_decoder_key(key)] = value
    return out


def _transformers_midas(state: dict[str, torch.Tensor]) -> nn.Module:
    """transformers' DPT-Hybrid as MiDaS builds it (timm's LayerNorm eps 1e-6, blocks 8 and 11 taken),
    allowed any input size (its embeddings resize the position grid when asked). Its hybrid
    reassembly takes square token grids only: square images."""
    import transformers

    config = transformers.DPTConfig(
        is_hybrid=True,
        hidden_size=768,
        reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[256, 512, 768, 768],
        backbone_out_indices=[0, 1, 8, 11],
        layer_norm_eps=1e-6,
        readout_type="project",
    )
    model = transformers.DPTForDepthEstimation(config).eval()
    model.load_state_dict(_midas_to_transformers(state), strict=True)
    embeddings = model.dpt.embeddings
    embeddings.forward = functools.partial(type(embeddings).forward, embeddings, interpolate_pos_encoding=True)
    return model
