"""The independent implementations the annotator tests compare with: controlnet_aux's modules,
imported one by one.

controlnet_aux (installed with --no-deps by `make test`) imports every annotator, and torchvision, in
its package ``__init__``; torchvision does not install beside the torch this project pins. So its
packages are entered here without running their ``__init__`` files, and the few torchvision names
some of its modules import at the top (transforms used for normalising, never for the networks) are
given a minimal stand-in written from torchvision's documented behaviour, only while such a module
is imported and only when torchvision is absent (and an empty ``timm``, which controlnet_aux.midas
imports at the top but calls only to build its network, never here).

MiDaS's network itself (controlnet_aux builds it with timm, which must not be installed beside this
project's torch) is transformers' DPT-Hybrid, an independent implementation of the same network,
loaded from the original file through the key map written here (``midas_detector``); Depth Anything
V2's key map to transformers' layout is here too.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch


def aux_available() -> bool:
    return importlib.util.find_spec("controlnet_aux") is not None


def aux_root() -> Path:
    spec = importlib.util.find_spec("controlnet_aux")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("controlnet_aux is not installed (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def aux_module(name: str) -> types.ModuleType:
    """``controlnet_aux.<name>`` (e.g. "hed", "open_pose.body", "lineart"), its parent packages
    entered without their ``__init__`` unless the module is itself a package's ``__init__``."""
    root = aux_root()
    full = f"controlnet_aux.{name}"
    if full in sys.modules:
        return sys.modules[full]
    parts = full.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            folder = str(root.joinpath(*parts[1:depth]))
            spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
            spec.submodule_search_locations = [folder]
            module = importlib.util.module_from_spec(spec)
            sys.modules[package] = module
    with _stand_ins():
        return importlib.import_module(full)


@contextlib.contextmanager
def matplotlib_colors() -> Iterator[None]:
    """controlnet_aux's hand drawing (open_pose/util.py ``draw_handpose``) imports matplotlib when
    called, for one function, ``matplotlib.colors.hsv_to_rgb``. Where matplotlib is absent, while
    the block runs: a stand-in module with that function as colorsys computes it (the same HSV
    sectors: the hue's sixth i and fraction f pick (v, t, p), (q, v, p), ... with p = v(1 - s),
    q = v(1 - sf), t = v(1 - s(1 - f)))."""
    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is not None:
        yield
        return
    colors = types.ModuleType("matplotlib.colors")
    colors.hsv_to_rgb = lambda hsv: np.array(colorsys.hsv_to_rgb(*(float(c) for c in hsv)))
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.colors = colors
    sys.modules.update({"matplotlib": matplotlib, "matplotlib.colors": colors})
    try:
        yield
    finally:
        sys.modules.pop("matplotlib", None)
        sys.modules.pop("matplotlib.colors", None)


def at_own_size(detector, rgb: np.ndarray, **options) -> np.ndarray:
    """A controlnet_aux detector's map at the image's own size (detect and image resolution = its
    short side: the detector resizes nothing)."""
    side = min(rgb.shape[:2])
    return detector(rgb, detect_resolution=side, image_resolution=side, output_type="np", **options)


class _stand_ins:
    """While a controlnet_aux module is imported: a minimal ``torchvision.transforms`` if torchvision
    is absent, and an empty ``timm`` if timm is absent."""

    def __enter__(self) -> None:
        self.added: list[tuple[str, types.ModuleType]] = []
        if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
            vision = types.ModuleType("torchvision")
            transforms = types.ModuleType("torchvision.transforms")
            transforms.Compose = _Compose
            transforms.Normalize = _Normalize
            transforms.ToTensor = _ToTensor
            transforms.ToPILImage = _ToPILImage
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


class _ToTensor:
    def __call__(self, pic):
        raise NotImplementedError("torchvision.transforms.ToTensor is not used by the compared code paths")


class _ToPILImage:
    def __call__(self, pic):
        raise NotImplementedError("torchvision.transforms.ToPILImage is not used by the compared code paths")


# ------------------------------------------------------------------------------------------------
# MiDaS and Depth Anything V2: key maps from the original files to transformers' layouts (written
# from the module structures; transformers' convert_dpt_hybrid_to_pytorch.py and
# convert_depth_anything_to_hf.py show the same)


def _split_qkv(prefix: str, kind: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    names = (f"{prefix}.attention.attention.{n}.{kind}" for n in ("query", "key", "value"))
    return dict(zip(names, value.chunk(3, dim=0), strict=True))


def _fusion(rest: str) -> str:
    # refinenetN.resConfUnitK.convJ -> residual_layerK.convolutionJ; out_conv -> projection
    rest = rest.replace("resConfUnit", "residual_layer").replace("out_conv", "projection")
    return rest.replace(".conv1", ".convolution1").replace(".conv2", ".convolution2")


_VIT_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense"}


def _decoder_key(key: str) -> str:
    """``scratch....`` of both models -> transformers' neck."""
    if key.startswith("scratch.layer"):
        return f"neck.convs.{int(key[len('scratch.layer')]) - 1}.{key.rsplit('.', 1)[1]}"
    level = int(key[len("scratch.refinenet")])
    return f"neck.fusion_stage.layers.{4 - level}.{_fusion(key.split('.', 2)[2])}"


def midas_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    vit = "pretrained.model."
    for key, value in state.items():
        if key.startswith(vit + "head."):
            continue  # the ImageNet classifier MiDaS never runs
        if key.startswith(vit + "blocks."):
            _, _, _, n, rest = key.split(".", 4)
            prefix = f"dpt.encoder.layer.{n}"
            if rest.startswith("attn.qkv."):
                out.update(_split_qkv(prefix, rest.rsplit(".", 1)[1], value))
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


def da2_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        kind = key.rsplit(".", 1)[1]
        if key.startswith("pretrained.blocks."):
            _, _, n, rest = key.split(".", 3)
            prefix = f"backbone.encoder.layer.{n}"
            if rest.startswith("attn.qkv."):  # transformers' DINOv2 names them q_proj, k_proj, v_proj
                names = (f"{prefix}.attention.{n}_proj.{kind}" for n in "qkv")
                out.update(zip(names, value.chunk(3, dim=0), strict=True))
                continue
            name = rest.rsplit(".", 1)[0]
            name = {"ls1": "layer_scale1", "ls2": "layer_scale2", "attn.proj": "attention.o_proj"}.get(name, name)
            out[f"{prefix}.{name}.{'lambda1' if kind == 'gamma' else kind}"] = value
        elif key.startswith("pretrained."):
            rest = key[len("pretrained.") :]
            simple = {
                "cls_token": "backbone.embeddings.cls_token",
                "mask_token": "backbone.embeddings.mask_token",
                "pos_embed": "backbone.embeddings.position_embeddings",
            }
            if rest in simple:
                out[simple[rest]] = value
            elif rest.startswith("patch_embed.proj."):
                out[f"backbone.embeddings.patch_embeddings.projection.{kind}"] = value
            else:
                out[f"backbone.layernorm.{kind}"] = value
        elif key.startswith("depth_head.projects.") or key.startswith("depth_head.resize_layers."):
            level = key.split(".")[2]
            part = "projection" if ".projects." in key else "resize"
            out[f"neck.reassemble_stage.layers.{level}.{part}.{kind}"] = value
        elif key.startswith("depth_head.scratch.output_conv"):
            rest = key[len("depth_head.scratch.") :]
            name = {"output_conv1": "conv1", "output_conv2.0": "conv2", "output_conv2.2": "conv3"}[
                rest.rsplit(".", 1)[0]
            ]
            out[f"head.{name}.{kind}"] = value
        else:
            out[_decoder_key(key[len("depth_head.") :])] = value
    return out


def transformers_midas(state: dict[str, torch.Tensor]) -> torch.nn.Module:
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
    model.load_state_dict(midas_to_transformers(state), strict=True)
    embeddings = model.dpt.embeddings
    embeddings.forward = functools.partial(type(embeddings).forward, embeddings, interpolate_pos_encoding=True)
    return model


class _Predicts(torch.nn.Module):
    """transformers' model as MidasDetector calls its network: (1, 3, H, W) -> (1, H, W)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(pixel_values=x).predicted_depth


def midas_detector(state: dict[str, torch.Tensor]):
    """controlnet_aux's MidasDetector (its own pre- and post-processing) around transformers'
    DPT-Hybrid holding the MiDaS file's tensors ``state``."""
    return aux_module("midas").MidasDetector(_Predicts(transformers_midas(state)))
