"""OpenPose face landmarks as the ControlNet 1.1 annotators find them (ControlNet-v1-1-nightly
annotator/openpose/face.py and util.py ``faceDetect``; the same in controlnet_aux open_pose/ and the
AUTOMATIC1111 extension): a square box around the nose sized by the eyes and ears, the face
network's last heatmaps of the box resized to 384 x 384, brought back to the box's size, and per
landmark the maximum of its heatmap where it exceeds 0.05.

The references also take the maximum of the 71st map, the background, and list only the landmarks
found, so their later landmarks move up a place when one is missing; here the 70 landmarks keep their
places (a landmark not found is absent) and the background is no landmark.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .maps import network_input, resize_to

INPUT_SIZE = 384
THRESHOLD = 0.05
LANDMARKS = 70
MIN_BOX = 20

Network = Callable[[torch.Tensor], torch.Tensor]

# Body keypoints that size the box, with the multiple of their distance from the nose it reaches:
# the eyes (14, 15) 3 times, the ears (16, 17) 1.5 times.
_REACH = ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5))


def face_box(body: np.ndarray, width: int, height: int) -> tuple[int, int, int] | None:
    """(x, y, side) of the square box around the nose of a body ((18, 2+): x, y in pixels, NaN where
    absent),
    or None without a nose and any of the eyes and ears, or when the box is under 20 pixels. The
    half-side is the largest of the eyes' and ears' reach (Chebyshev distance times 3 or 1.5); the
    box is cut at the image's left and top, and at its right and bottom where its half-side would
    cross them (util.py ``faceDetect``)."""
    if np.isnan(body[0, :2]).any() or all(np.isnan(body[k, :2]).any() for k, _ in _REACH):
        return None
    x0, y0 = (float(v) for v in body[0, :2])
    half = 0.0
    for k, reach in _REACH:
        if not np.isnan(body[k, :2]).any():
            x1, y1 = (float(v) for v in body[k, :2])
            half = max(half, max(abs(x0 - x1), abs(y0 - y1)) * reach)
    x, y = max(x0 - half, 0), max(y0 - half, 0)
    side = min(half * 2 if x + half <= width else width - x, half * 2 if y + half <= height else height - y)
    return (int(x), int(y), int(side)) if side >= MIN_BOX else None


def face_heatmaps(
    network: Network,
    bgr: np.ndarray,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> np.ndarray:
    """The face network's last heatmaps (71, H, W) float32 over a BGR uint8 box: the box resized to
    384 x 384, the maps resized to the box bilinearly with the corners aligned (torch's
    interpolate, in float32)."""
    h, w = bgr.shape[:2]
    with torch.inference_mode():
        maps = network(network_input(resize_to(bgr, INPUT_SIZE, INPUT_SIZE), device, dtype, channels_last))
        maps = F.interpolate(maps.float(), (h, w), mode="bilinear", align_corners=True)
        return maps[0].cpu().numpy()


def face_peaks(heatmaps: np.ndarray) -> np.ndarray:
    """The 70 landmarks (70, 3) float64: x and y in the box's pixels of the map's first maximum in
    row-major order, and the map's value there; a row of NaN where the map nowhere exceeds 0.05."""
    peaks = np.full((LANDMARKS, 3), np.nan)
    for part in range(LANDMARKS):
        above = heatmaps[part] > THRESHOLD
        if above.any():
            y, x = np.unravel_index(int(np.argmax(np.where(above, heatmaps[part], -np.inf))), above.shape)
            peaks[part] = (x, y, heatmaps[part, y, x])
    return peaks
