"""The OpenPose networks the ControlNet 1.1 pose annotators run (lllyasviel/Annotators:
``body_pose_model.pth``, ``hand_pose_model.pth``, ``facenet.pth``; CMU's OpenPose models as converted
to PyTorch by pytorch-openpose; CMU's licence: non-commercial use).

All three are convolutional pose machines: a VGG-19 stem (3x3 convolutions with ReLU, a 2x2 max-pool
after the 2nd, 4th and 8th) gives 128-channel features at 1/8 of the input, then six stages each
predict the maps again from the features and the previous stage's maps. The body network has two
branches per stage, part affinity fields (38 channels, "L1") and part heatmaps (18 parts and the
background, "L2"); the hand network predicts 21 keypoints and the background, the face network 70
landmarks and the background (ControlNet-v1-1-nightly annotator/openpose/model.py and face.py).

Module names are the files' keys: every convolution is an attribute of the network named as in the
file (``conv1_1``, ``conv5_5_CPM_L2``, ``Mconv7_stage6_L1``), so the files load strictly as they are.
(The reference's body and hand modules nest the layers in ``model0``, ``model1_1``, ... and map
their names onto the file's with ``util.transfer``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL = "pool"

# (name, input channels, output channels, kernel size) of the stems; POOL marks a 2x2 max-pool.
_VGG_HEAD = (
    ("conv1_1", 3, 64, 3),
    ("conv1_2", 64, 64, 3),
    POOL,
    ("conv2_1", 64, 128, 3),
    ("conv2_2", 128, 128, 3),
    POOL,
    ("conv3_1", 128, 256, 3),
    ("conv3_2", 256, 256, 3),
    ("conv3_3", 256, 256, 3),
    ("conv3_4", 256, 256, 3),
    POOL,
    ("conv4_1", 256, 512, 3),
    ("conv4_2", 512, 512, 3),
)
BODY_STEM = (*_VGG_HEAD, ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3))
HAND_STEM = (
    *_VGG_HEAD,
    ("conv4_3", 512, 512, 3),
    ("conv4_4", 512, 512, 3),
    ("conv5_1", 512, 512, 3),
    ("conv5_2", 512, 512, 3),
    ("conv5_3_CPM", 512, 128, 3),
)
FEATURES = 128  # channels of the stems' output


def _refinement(stage: int, suffix: str, channels_in: int, channels_out: int) -> tuple:
    """Stages 2-6: five 7x7 convolutions, then two 1x1 ones to the maps."""
    return (
        (f"Mconv1_stage{stage}{suffix}", channels_in, 128, 7),
        *((f"Mconv{i}_stage{stage}{suffix}", 128, 128, 7) for i in range(2, 6)),
        (f"Mconv6_stage{stage}{suffix}", 128, 128, 1),
        (f"Mconv7_stage{stage}{suffix}", 128, channels_out, 1),
    )


class _PoseMachine(nn.Module):
    """Convolutions registered under their file names, run in sequences with ReLU between them."""

    def _add(self, layers: tuple) -> tuple:
        for layer in layers:
            if layer != POOL:
                name, channels_in, channels_out, kernel = layer
                self.add_module(name, nn.Conv2d(channels_in, channels_out, kernel, padding=kernel // 2))
        return layers

    def _run(self, layers: tuple, x: torch.Tensor, relu_last: bool = True) -> torch.Tensor:
        """``x`` through ``layers``: ReLU after every convolution except, unless ``relu_last``, the
        last one (the maps a stage predicts are linear)."""
        for k, layer in enumerate(layers):
            if layer == POOL:
                x = F.max_pool2d(x, 2, 2)
                continue
            x = getattr(self, layer[0])(x)
            if relu_last or k < len(layers) - 1:
                x = F.relu(x, inplace=True)
        return x


class BodyPoseNet(_PoseMachine):
    """(1, 3, H, W) BGR pixels / 256 - 0.5 -> (part affinity fields (1, 38, H/8, W/8), heatmaps
    (1, 19, H/8, W/8)) of the sixth stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = self._add(BODY_STEM)
        first = tuple(
            (
                (f"conv5_1_CPM_{b}", FEATURES, 128, 3),
                (f"conv5_2_CPM_{b}", 128, 128, 3),
                (f"conv5_3_CPM_{b}", 128, 128, 3),
                (f"conv5_4_CPM_{b}", 128, 512, 1),
                (f"conv5_5_CPM_{b}", 512, maps, 1),
            )
            for b, maps in (("L1", 38), ("L2", 19))
        )
        later = tuple(
            tuple(_refinement(stage, f"_{b}", FEATURES + 38 + 19, maps) for b, maps in (("L1", 38), ("L2", 19)))
            for stage in range(2, 7)
        )
        self.stages = tuple((self._add(pafs), self._add(heat)) for pafs, heat in (first, *later))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._run(self.stem, x)
        pafs = heatmaps = features
        for k, (paf_layers, heat_layers) in enumerate(self.stages):
            inputs = features if k == 0 else torch.cat([pafs, heatmaps, features], 1)
            pafs = self._run(paf_layers, inputs, relu_last=False)
            # The reference's list of layers without ReLU names Mconv7_stage6_L1 twice and lacks
            # Mconv7_stage6_L2, so its last heatmaps pass a ReLU (annotator/openpose/model.py).
            heatmaps = self._run(heat_layers, inputs, relu_last=k == len(self.stages) - 1)
        return pafs, heatmaps


class _KeypointNet(_PoseMachine):
    """The hand and face networks: one branch of `maps` channels per stage."""

    maps = 0

    def __init__(self) -> None:
        super().__init__()
        self.stem = self._add(HAND_STEM)
        first = (("conv6_1_CPM", FEATURES, 512, 1), ("conv6_2_CPM", 512, self.maps, 1))
        later = tuple(_refinement(stage, "", FEATURES + self.maps, self.maps) for stage in range(2, 7))
        self.stages = tuple(self._add(layers) for layers in (first, *later))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._run(self.stem, x)
        maps = features
        for k, layers in enumerate(self.stages):
            maps = self._run(layers, features if k == 0 else torch.cat([maps, features], 1), relu_last=False)
        return maps


class HandPoseNet(_KeypointNet):
    """(1, 3, H, W) BGR pixels / 256 - 0.5 -> heatmaps (1, 22, H/8, W/8): 21 hand keypoints and the
    background (annotator/openpose/model.py, handpose_model)."""

    maps = 22


class FaceNet(_KeypointNet):
    """(1, 3, H, W) BGR pixels / 256 - 0.5 -> heatmaps (1, 71, H/8, W/8) of the sixth stage: 70 face
    landmarks and the background (annotator/openpose/face.py, FaceNet; the earlier stages' maps,
    which the reference also returns, are not used)."""

    maps = 71
