"""OpenPose body detection as the ControlNet 1.1 annotators do it (ControlNet-v1-1-nightly
annotator/openpose/body.py; the same in controlnet_aux open_pose/body.py and the AUTOMATIC1111
extension's annotator/openpose/body.py): the network's heatmaps and part affinity fields (PAFs) at
one scale, the peaks of the smoothed heatmaps, the limbs the PAFs support, and the people the limbs
join. Every step is computed in the reference's order and precision (float64 maps holding the
network's float32 values), so that the keypoints are the reference's on the same maps.

Keypoints are numbered 0..17 as in `keypoints.py` (the reference numbers them from 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .maps import gaussian_filter, network_input, pad_to_stride, rescale, resize_to

BOX_SIZE = 368  # the network's input height at scale 1
SCALE = 0.5  # the one scale the reference searches (its list of four is commented out)
STRIDE = 8  # input pixels per map pixel
PAD_VALUE = 128
PEAK_THRESHOLD = 0.1  # "thre1": smoothed heatmap value a peak must exceed
PAF_THRESHOLD = 0.05  # "thre2": PAF alignment a limb sample must exceed
SAMPLES = 10  # points sampled along a candidate limb ("mid_num")

# The 19 limbs (pairs of keypoints) and the two PAF channels (x, y) of each, in the reference's
# order, which is also the order people are assembled in (limbSeq and mapIdx - 19).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
PAF_CHANNELS = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
NEW_PERSON_LIMBS = 17  # only the first 17 limbs start a person; the ear-shoulder ones only join

Network = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _map_to_image(output: torch.Tensor, padded: tuple[int, int], pad: tuple[int, int], size: tuple[int, int]):
    """One network output (1, C, h, w) as (H, W, C) float32 over the image: upsampled by the
    stride, the padding cut off, resized to the image (the reference's order of resizes)."""
    maps = output[0].float().cpu().numpy().transpose(1, 2, 0)
    maps = rescale(maps, STRIDE)[: padded[0] - pad[0], : padded[1] - pad[1], :]
    return resize_to(maps, *size)


def body_maps(
    network: Network,
    bgr: np.ndarray,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The body network's (heatmaps (H, W, 19), PAFs (H, W, 38)) over a BGR uint8 image, float64:
    the image scaled to 184 rows (0.5 x 368), padded to multiples of 8 with grey 128, the outputs
    brought back to the image's size."""
    h, w = bgr.shape[:2]
    scaled = rescale(bgr, SCALE * BOX_SIZE / h)
    padded, down, right = pad_to_stride(scaled, STRIDE, PAD_VALUE)
    with torch.inference_mode():
        pafs, heatmaps = network(network_input(padded, device, dtype, channels_last))
    where = (padded.shape[:2], (down, right), (h, w))
    return _map_to_image(heatmaps, *where).astype(np.float64), _map_to_image(pafs, *where).astype(np.float64)


def find_peaks(heatmaps: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[np.ndarray]:
    """Per keypoint (0..17), its candidates (n, 4): x, y (pixels), the heatmap's value there and an
    id numbering all candidates in order. A candidate is a pixel where the heatmap smoothed by a
    Gaussian of sigma 3 exceeds ``threshold`` and is not below its four neighbours; row by row."""
    peaks, counter = [], 0
    for part in range(18):
        raw = heatmaps[:, :, part]
        smooth = gaussian_filter(raw, 3)
        top = smooth > threshold  # implies >= 0, the value the reference compares border pixels with
        top[1:, :] &= smooth[1:, :] >= smooth[:-1, :]
        top[:-1, :] &= smooth[:-1, :] >= smooth[1:, :]
        top[:, 1:] &= smooth[:, 1:] >= smooth[:, :-1]
        top[:, :-1] &= smooth[:, :-1] >= smooth[:, 1:]
        ys, xs = np.nonzero(top)
        ids = np.arange(counter, counter + len(xs))
        peaks.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64).reshape(-1, 4))
        counter += len(xs)
    return peaks


def _limb_scores(a: np.ndarray, b: np.ndarray, paf: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """For every pair of candidates (a_i, b_j): the mean alignment of the PAF with the direction
    a -> b at ten points from a to b, plus a penalty for limbs longer than half the image height;
    and whether more than 8 of the ten points align better than PAF_THRESHOLD."""
    start, stop = a[:, None, :2], b[None, :, :2]  # (nA, 1, 2), (1, nB, 2): integral x, y
    delta = stop - start
    norm = np.maximum(0.001, np.sqrt(delta[..., 0] * delta[..., 0] + delta[..., 1] * delta[..., 1]))
    unit = delta / norm[..., None]
    # np.linspace(start, stop, 10) for each pair, element by element: k * step + start, the last
    # point the stop itself.
    k = np.arange(SAMPLES, dtype=np.float64)
    line = k[:, None, None, None] * (delta / (SAMPLES - 1)) + start  # (10, nA, nB, 2)
    line[-1] = np.broadcast_to(stop, line.shape[1:])
    cols, rows = np.rint(line[..., 0]).astype(np.intp), np.rint(line[..., 1]).astype(np.intp)
    along = paf[rows, cols, 0] * unit[..., 0] + paf[rows, cols, 1] * unit[..., 1]  # (10, nA, nB)
    total = along[0]
    for s in range(1, SAMPLES):  # summed one after another, as Python's sum() does
        total = total + along[s]
    score = total / SAMPLES + np.minimum(0.5 * height / norm - 1, 0)
    aligned = np.count_nonzero(along > PAF_THRESHOLD, axis=0) > 0.8 * SAMPLES
    return score, aligned


def connect_limbs(peaks: list[np.ndarray], pafs: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per limb, the connections (m, 5): candidate id of each end, the limb's score, and the two
    candidates' indices within their keypoint; None where a keypoint of the limb has no candidate.
    Pairs whose PAF supports them are taken best first, each candidate in one connection at most."""
    connections: list[np.ndarray | None] = []
    for (part_a, part_b), channels in zip(LIMBS, PAF_CHANNELS, strict=True):
        a, b = peaks[part_a], peaks[part_b]
        if not len(a) or not len(b):
            connections.append(None)
            continue
        score, aligned = _limb_scores(a, b, pafs[:, :, list(channels)], height)
        rows, cols = np.nonzero(aligned & (score > 0))  # in the reference's (i, j) loop order
        passing = [(int(i), int(j), score[i, j]) for i, j in zip(rows, cols, strict=True)]
        chosen: list[list[float]] = []
        used_a, used_b = set(), set()
        for i, j, s in sorted(passing, key=lambda c: c[2], reverse=True):  # stable: ties keep (i, j) order
            if i not in used_a and j not in used_b:
                chosen.append([a[i, 3], b[j, 3], s, i, j])
                used_a.add(i)
                used_b.add(j)
                if len(chosen) >= min(len(a), len(b)):
                    break
        connections.append(np.array(chosen, dtype=np.float64).reshape(-1, 5))
    return connections


def group_people(candidates: np.ndarray, connections: list[np.ndarray | None]) -> np.ndarray:
    """The people (n, 20): per keypoint the id of its candidate (-1: none), then the total score and
    the number of keypoints. Limbs are added in order: a limb sharing an end with one person extends
    it, one joining two people with no keypoint in common merges them, a new one starts a person
    (the first 17 limbs only). People with fewer than 4 keypoints or a mean score below 0.4 are
    dropped (body.py; where three people share a limb's end, which the reference fails on, the
    first two are taken)."""
    people = np.empty((0, 20))
    for k, found_limbs in enumerate(connections):
        if found_limbs is None:
            continue
        part_a, part_b = LIMBS[k]
        for id_a, id_b, score, _, _ in found_limbs:
            owners = [r for r in range(len(people)) if people[r, part_a] == id_a or people[r, part_b] == id_b][:2]
            if len(owners) == 1 and people[owners[0], part_b] != id_b:
                _add_keypoint(people[owners[0]], part_b, id_b, candidates[int(id_b), 2] + score)
            elif len(owners) == 2:
                first, second = people[owners[0]], people[owners[1]]
                shared = ((first >= 0).astype(int) + (second >= 0).astype(int))[:-2]
                if not np.any(shared == 2):  # disjoint: one person seen as two
                    first[:-2] += second[:-2] + 1
                    first[-2:] += second[-2:]
                    first[-2] += score
                    people = np.delete(people, owners[1], 0)
                else:
                    _add_keypoint(first, part_b, id_b, candidates[int(id_b), 2] + score)
            elif not owners and k < NEW_PERSON_LIMBS:
                row = -np.ones(20)
                row[part_a], row[part_b] = id_a, id_b
                row[-1] = 2
                row[-2] = 0 + candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                people = np.vstack([people, row])
    keep = [r for r in range(len(people)) if not (people[r, -1] < 4 or people[r, -2] / people[r, -1] < 0.4)]
    return people[keep]


def _add_keypoint(person: np.ndarray, part: int, candidate_id: float, gain: float) -> None:
    person[part] = candidate_id
    person[-1] += 1
    person[-2] += gain


def detect_bodies(heatmaps: np.ndarray, pafs: np.ndarray) -> list[np.ndarray]:
    """Everyone on the maps: per person (18, 3) float64 keypoint x, y in pixels and the heatmap's
    value there, a row of NaN where absent."""
    peaks = find_peaks(heatmaps)
    candidates = np.concatenate(peaks, axis=0)
    people = group_people(candidates, connect_limbs(peaks, pafs, heatmaps.shape[0]))
    bodies = []
    for person in people:
        ids = person[:18].astype(int)
        body = np.full((18, 3), np.nan)
        body[ids >= 0] = candidates[ids[ids >= 0], :3]
        bodies.append(body)
    return bodies
