"""OpenPose hand keypoints as the ControlNet 1.1 annotators find them (ControlNet-v1-1-nightly
annotator/openpose/hand.py and util.py ``handDetect``; the same in controlnet_aux open_pose/ and the
AUTOMATIC1111 extension): a square box beyond each wrist sized by the forearm and upper arm, the hand
network's heatmaps of the box at four scales averaged on a 128 x 128 grid, and per keypoint the
maximum of the strongest blob of its heatmap."""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch

from .maps import gaussian_filter, network_input, pad_to_stride, rescale, resize_to

BOX_SIZE = 368
SCALES = (0.5, 1.0, 1.5, 2.0)
STRIDE = 8
PAD_VALUE = 128
GRID = 128  # the heatmaps of all scales are averaged at this size
THRESHOLD = 0.05  # smoothed heatmap value a keypoint's blob must exceed
WRIST_RATIO = 0.33  # the box's centre lies this fraction of the forearm beyond the wrist
MIN_BOX = 20  # smaller boxes (pixels) are not searched

Network = Callable[[torch.Tensor], torch.Tensor]

# Body keypoints (shoulder, elbow, wrist) of each arm; the left arm first, as the reference does.
ARMS = ((5, 6, 7, True), (2, 3, 4, False))


def hand_boxes(body: np.ndarray, width: int, height: int) -> list[tuple[int, int, int, bool]]:
    """For each arm of a body ((18, 2+): x, y in pixels, NaN where absent) whose shoulder, elbow and wrist are
    all found: (x, y, side, is_left), a square box of at least 20 pixels within the image, its
    centre a third of the forearm beyond the wrist, its side 1.5 x max(forearm, 0.9 x upper arm)
    (CMU OpenPose's handDetector.cpp, as util.py ``handDetect`` computes it)."""
    boxes = []
    for shoulder, elbow, wrist, is_left in ARMS:
        if np.isnan(body[[shoulder, elbow, wrist], :2]).any():
            continue
        (x1, y1), (x2, y2), (x3, y3) = (tuple(float(v) for v in body[k, :2]) for k in (shoulder, elbow, wrist))
        x = x3 + WRIST_RATIO * (x3 - x2)
        y = y3 + WRIST_RATIO * (y3 - y2)
        forearm = math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2)
        upper_arm = math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
        side = 1.5 * max(forearm, 0.9 * upper_arm)
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        side = min(side if x + side <= width else width - x, side if y + side <= height else height - y)
        if side >= MIN_BOX:
            boxes.append((int(x), int(y), int(side), is_left))
    return boxes


def hand_heatmaps(
    network: Network,
    bgr: np.ndarray,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> np.ndarray:
    """The hand network's heatmaps (128, 128, 22) float64 of a BGR uint8 box: the box blurred by a
    Gaussian of sigma 0.8, resized to squares of 184, 368, 552 and 736 pixels, each scale's maps
    upsampled by the stride and resized to 128 x 128, the four averaged."""
    blurred = cv2.GaussianBlur(bgr, (0, 0), 0.8)
    average = np.zeros((GRID, GRID, 22))
    for scale in SCALES:
        size = scale * BOX_SIZE
        padded, down, right = pad_to_stride(resize_to(blurred, size, size), STRIDE, PAD_VALUE)
        with torch.inference_mode():
            output = network(network_input(padded, device, dtype, channels_last))
        maps = rescale(output[0].float().cpu().numpy().transpose(1, 2, 0), STRIDE)
        maps = maps[: padded.shape[0] - down, : padded.shape[1] - right, :]
        average += resize_to(maps, GRID, GRID) / len(SCALES)
    return average


def hand_peaks(heatmaps: np.ndarray, height: int, width: int) -> np.ndarray:
    """The 21 keypoints (21, 3) float64: x and y in the box's pixels ((0, 0): not found) and the
    averaged heatmap's value at the maximum (0: not found). Per keypoint,
    the pixels where its heatmap smoothed by a Gaussian of sigma 3 exceeds 0.05 form blobs
    (8-connected); in the blob of the largest summed heatmap, the maximum of the heatmap, scaled
    from the 128-pixel grid to the box and truncated."""
    peaks = np.zeros((21, 3))
    for part in range(21):
        raw = heatmaps[:, :, part].copy()
        above = (gaussian_filter(raw, 3) > THRESHOLD).astype(np.uint8)
        if not above.any():
            continue
        count, labels = cv2.connectedComponents(above, connectivity=8)
        # The blobs' sums over the same pixels in the same order as the reference's skimage labels,
        # whose numbering may differ but whose pixel sets are the same.
        sums = [np.sum(raw[labels == label]) for label in range(1, count)]
        raw[labels != int(np.argmax(sums)) + 1] = 0
        y, x = np.unravel_index(int(np.argmax(raw)), raw.shape)
        column, row = int(float(x) * float(width) / float(GRID)), int(float(y) * float(height) / float(GRID))
        peaks[part] = (column, row, raw[y, x])
    return peaks
