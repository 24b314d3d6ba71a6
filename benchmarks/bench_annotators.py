"""Network annotators on a CPU: ours against controlnet_aux's detectors on the very same weight files.

For each network annotator, on scikit-image's astronaut (a real 512x512 photograph), in one process,
three variants are timed in alternating rounds (one warm-up call each, which also reads the
weights, then the median of --rounds rounds, the order rotated from round to round):

- ours, policy: ``annotate(name, photo, size, runtime=Runtime.default(folder))`` (run_annotator's
  map, and the poses of the openpose ones): the runtime policy's dtype and layout (bfloat16 +
  channels_last on a CPU with native bf16, else float32);
- ours, fp32: the same with ``Runtime.default(folder, dtype="float32")`` (contiguous float32);
- controlnet_aux: its detector, read from the same folder, called with ``detect_resolution`` and
  ``image_resolution`` equal to the size (so that both do the same work: no extra resize), float32
  as it runs.

Each variant keeps its own loaded network (a copy of our registry entry per runtime; the registry
keeps one runtime's network at a time), so no round reloads weights. The table gives the medians,
controlnet_aux's time over ours, the largest difference in levels between our float32 map and
controlnet_aux's (0 expected: the annotator tests assert equality on these weights), and the mean
difference of the policy's map from float32's.

Weights: ``--annotators-dir DIR`` uses the real files found there (under their original names, as
controlnet_aux reads them); an annotator whose files are not all there gets random weights with the
real key layouts, written to a temporary folder by the annotator tests' writers
(tests/annotator_weights.py), scaled so that the maps are neither flat nor saturated. Random weights
time the same work except where the work depends on the picture: OpenPose (random heatmaps give
thousands of keypoint candidates, or no arm and no face whole; the random body network's last two
convolutions are set so that it finds one whole person on the astronaut, about one candidate per
keypoint: see annotator_weights.openpose_body_of_one_person. The hand network then runs on two
boxes and the face network on one, as on a photo of one person; each openpose row prints the
people, hands and faces ours found) and M-LSD's segments (random weights give many).

Where controlnet_aux's work differs from ours (printed under the table too):
- depth_midas: controlnet_aux builds MiDaS with timm, which is not installed here; its
  MidasDetector's own pre- and post-processing runs around transformers' DPT-Hybrid (another
  implementation of the same network, loaded from the same file).
- depth_anything_v2 (ViT-L): controlnet_aux 0.0.10 has no Depth Anything V2: ours alone.
- openpose, openpose_hand, openpose_face, openpose_full (and openpose_faceonly with --only):
  controlnet_aux's OpenposeDetector holding the estimators the annotator runs (Body, and Hand and/or
  Face read from the same files), called with include_hand / include_face as the annotator detects
  and include_body=False for openpose_faceonly. Its face drawing adds a 71st dot (the maximum of the
  face network's background channel), which ours leaves out: the face maps differ by that dot.
- lineart_realistic / lineart_coarse: LineartDetector holding the one generator used.

    python benchmarks/bench_annotators.py [--annotators-dir DIR] [--rounds 3] [--only a,b] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests.*

from tests import annotator_weights
from tests.reference_annotators import aux_available, aux_module, matplotlib_colors, midas_detector

import common
from controlnet import runtime as runtime_policy
from controlnet.annotators import ANNOTATORS, Runtime, annotate, get_annotator

# Timed by default, in this order; those with no controlnet_aux oracle are timed alone.
ANNOTATOR_NAMES = (
    "softedge_hed",
    "softedge_pidinet",
    "lineart_realistic",
    "lineart_coarse",
    "lineart_anime",
    "mlsd",
    "openpose",
    "openpose_hand",
    "openpose_face",
    "openpose_full",
    "depth_midas",
    "normal_bae",
    "depth_anything_v2",
)
# Also accepted by --only (the Depth Anything ones ours alone).
EXTRA_NAMES = ("depth_anything_v2_vitb", "depth_anything_v2_vits", "openpose_faceonly")
NO_ORACLE = {n for n in (*ANNOTATOR_NAMES, *EXTRA_NAMES) if n.startswith("depth_anything_v2")}

NOTES = {
    "depth_midas": "controlnet_aux's MidasDetector around transformers' DPT-Hybrid "
    "(its own network needs timm, not installed here)",
    "openpose": "controlnet_aux's OpenposeDetector with its body estimator only",
    "openpose_hand": "controlnet_aux's OpenposeDetector with its Body and Hand estimators, include_hand",
    "openpose_face": "controlnet_aux's OpenposeDetector with its Body and Face estimators, include_face; "
    "its map adds a 71st face dot (the background channel's maximum) that ours leaves out",
    "openpose_full": "controlnet_aux's OpenposeDetector with Body, Hand and Face, include_hand and include_face; "
    "its map adds the 71st face dot",
    "openpose_faceonly": "controlnet_aux's OpenposeDetector with Body and Face, include_body=False, "
    "include_face; its map adds the 71st face dot",
}
# (include_hand, include_face, include_body) of each OpenPose annotator, as controlnet_aux takes them.
OPENPOSE = {
    "openpose": (False, False, True),
    "openpose_hand": (True, False, True),
    "openpose_face": (False, True, True),
    "openpose_full": (True, True, True),
    "openpose_faceonly": (False, True, False),
}
RANDOM_NOTES = {
    name: "the random body network's last layers set to find one whole person (annotator_weights."
    "openpose_body_of_one_person): grouping, drawing and the hand and face boxes cost what a photo of one "
    "person costs, not what random maps would"
    for name in OPENPOSE
}


def photo(size: int) -> np.ndarray:
    import skimage.data

    rgb = skimage.data.astronaut()  # 512 x 512
    if rgb.shape[0] != size:
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


class Ours:
    """``annotate(name, image, size, runtime=...)`` with this variant's own copy of the registry's
    annotator in place for the call: the copy keeps its network loaded for its runtime, whatever the
    other variant loads. Returns the map (as run_annotator); keeps the last call's data (poses)."""

    def __init__(self, name: str, runtime: Runtime, size: int) -> None:
        self.name, self.runtime, self.size = name, runtime, size
        self.annotator = dataclasses.replace(get_annotator(name))
        self.data: dict | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        registered = ANNOTATORS[self.name]
        ANNOTATORS[self.name] = self.annotator
        try:
            result = annotate(self.name, image, self.size, runtime=self.runtime)
        finally:
            ANNOTATORS[self.name] = registered
        self.data = result.data
        return result.image


def detected(poses: dict) -> str:
    """People, hands and faces in OpenPose JSON (what the hand and face networks ran on)."""
    people = poses["people"]

    def count(key: str) -> int:
        return sum(bool(p.get(key)) for p in people)

    hands = count("hand_left_keypoints_2d") + count("hand_right_keypoints_2d")
    return f"{len(people)} people, {hands} hands, {count('face_keypoints_2d')} faces"


def weight_folder(name: str, real: Path | None, scratch: Path) -> tuple[Path, str]:
    """Where annotator ``name``'s files are read from, and "real" or "random"."""
    files = [w.name for w in get_annotator(name).weights]
    if real is not None and all((real / f).is_file() for f in files):
        return real, "real"
    for f in files:
        if not (scratch / f).exists():
            tensors = annotator_weights.openpose_body_of_one_person() if f == annotator_weights.BODY else None
            annotator_weights.write(scratch, f, tensors)
    return scratch, "random"


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


def _openpose(folder: Path, name: str):
    """OpenposeDetector holding the estimators annotator ``name`` runs (from_pretrained would read
    all three files, which only openpose_full needs), called with its include_* flags."""
    package = aux_module("open_pose")
    hand, face, body = OPENPOSE[name]
    detector = package.OpenposeDetector(
        aux_module("open_pose.body").Body(str(folder / annotator_weights.BODY)),
        aux_module("open_pose.hand").Hand(str(folder / annotator_weights.HAND)) if hand else None,
        aux_module("open_pose.face").Face(str(folder / annotator_weights.FACE)) if face else None,
    )
    return functools.partial(detector, include_body=body, include_hand=hand, include_face=face)


def aux_detector(name: str, folder: Path) -> Callable[..., np.ndarray]:
    """controlnet_aux's detector of annotator ``name`` on the files in ``folder``."""
    builders: dict[str, Callable[[], Callable[..., np.ndarray]]] = {
        "softedge_hed": lambda: aux_module("hed").HEDdetector.from_pretrained(str(folder)),
        "softedge_pidinet": lambda: aux_module("pidi").PidiNetDetector.from_pretrained(str(folder)),
        "lineart_realistic": lambda: _lineart(folder, annotator_weights.REALISTIC),
        "lineart_coarse": lambda: functools.partial(_lineart(folder, annotator_weights.COARSE), coarse=True),
        "lineart_anime": lambda: aux_module("lineart_anime").LineartAnimeDetector.from_pretrained(str(folder)),
        "mlsd": lambda: annotator_weights.mlsd_module().MLSDdetector.from_pretrained(str(folder)),
        **{pose: functools.partial(_openpose, folder, pose) for pose in OPENPOSE},
        "depth_midas": lambda: midas_detector(_load(folder / annotator_weights.MIDAS)),
        "normal_bae": lambda: aux_module("normalbae").NormalBaeDetector.from_pretrained(str(folder)),
    }
    return builders[name]()


def bench_one(name: str, image: np.ndarray, size: int, folder: Path, rounds: int) -> dict:
    """The medians of each variant, and the differences between their maps."""
    ours = Ours(name, Runtime.default(folder, dtype="float32"), size)
    variants: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "policy": Ours(name, Runtime.default(folder), size),
        "fp32": ours,
    }
    if name not in NO_ORACLE:
        detector = aux_detector(name, folder)
        variants["aux"] = lambda rgb: detector(rgb, detect_resolution=size, image_resolution=size, output_type="np")
    maps, first, times = {}, {}, {v: [] for v in variants}
    for variant, call in variants.items():  # warm-up: reads the weights, the kernels' first calls
        maps[variant], first[variant] = common.timed(lambda call=call: call(image))
    order = list(variants)
    for r in range(rounds):
        for variant in order[r % len(order) :] + order[: r % len(order)]:
            times[variant].append(common.timed(lambda variant=variant: variants[variant](image))[1])
    result = {v: common.median(t) for v, t in times.items()}
    result["first"] = first
    if ours.data is not None:
        result["detected"] = detected(ours.data)
    ours32 = maps["fp32"].astype(np.int16)
    result["policy_vs_fp32"] = float(np.abs(maps["policy"].astype(np.int16) - ours32).mean())
    if "aux" in maps:
        theirs = np.asarray(maps["aux"])
        if theirs.shape == ours32.shape:
            difference = np.abs(theirs.astype(np.int16) - ours32)
            result["aux_max"], result["aux_count"] = int(difference.max()), int(np.count_nonzero(difference))
        else:
            result["aux_shape"] = theirs.shape
    return result


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators-dir", type=Path, help="real weight files, where present (default: random)")
    parser.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 3; quick: 1)")
    parser.add_argument("--only", help=f"comma-separated annotators (default: {','.join(ANNOTATOR_NAMES)})")
    parser.add_argument("--quick", action="store_true", help="1 round at 256x256")
    parser.add_argument("--size", type=int, help="the photo's side (default 512; quick: 256)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.size = args.size or (256 if args.quick else 512)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(ANNOTATOR_NAMES)
    unknown = [n for n in args.names if n not in (*ANNOTATOR_NAMES, *EXTRA_NAMES)]
    if unknown:
        parser.error(f"unknown annotator {unknown[0]!r}; choose from {', '.join((*ANNOTATOR_NAMES, *EXTRA_NAMES))}")
    if args.size % 64 or args.size <= 0:
        parser.error("--size must be a positive multiple of 64")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.annotators_dir is not None and not args.annotators_dir.is_dir():
        parser.error(f"--annotators-dir {args.annotators_dir} is not a folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if not aux_available() and any(n not in NO_ORACLE for n in args.names):
        sys.exit("controlnet_aux is not installed: make install-dev installs it (without its dependencies)")
    started = time.perf_counter()
    print(common.cpu_line())
    print(common.machine_line())
    policy = Runtime.default()
    layout = (
        "channels_last"
        if runtime_policy.use_channels_last(policy.device, runtime_policy.DTYPES[policy.dtype])
        else "contiguous"
    )
    print(
        f"runtime policy here: {policy.device} {policy.dtype} {layout}; photo: skimage astronaut at "
        f"{args.size}x{args.size}; median of {args.rounds} round(s) after one warm-up each"
    )
    image = photo(args.size)
    header = [
        "annotator",
        "weights",
        "ours policy s",
        "ours fp32 s",
        "controlnet_aux s",
        "aux / policy",
        "aux / fp32",
        "max |fp32 - aux|",
        "policy vs fp32",
    ]
    rows, notes = [], []
    # controlnet_aux's hand drawing calls matplotlib (one colour function): a stand-in where absent
    with tempfile.TemporaryDirectory(prefix="bench-annotators-") as scratch, matplotlib_colors():
        for name in args.names:
            made = time.perf_counter()
            folder, kind = weight_folder(name, args.annotators_dir, Path(scratch))
            made = time.perf_counter() - made
            result = bench_one(name, image, args.size, folder, args.rounds)
            aux = result.get("aux")
            if aux is None:
                difference = "-"
            elif "aux_shape" in result:
                difference = f"shape {result['aux_shape']}"
            else:
                difference = f"{result['aux_max']} ({result['aux_count']} px)" if result["aux_max"] else "0"
            row = [
                name,
                kind,
                f"{result['policy']:.3f}",
                f"{result['fp32']:.3f}",
                "-" if aux is None else f"{aux:.3f}",
                "-" if aux is None else f"{aux / result['policy']:.2f}x",
                "-" if aux is None else f"{aux / result['fp32']:.2f}x",
                difference,
                f"{result['policy_vs_fp32']:.2f} lv",
            ]
            rows.append(row)
            first = ", ".join(f"{v} {s:.2f} s" for v, s in result["first"].items())
            written = f", written in {made:.1f} s" if kind == "random" else ""
            found = f"; ours found {result['detected']}" if "detected" in result else ""
            print(f"  {name}: {' | '.join(row[2:])}  (weights {kind}{written}; first calls {first}{found})", flush=True)
            if name in NO_ORACLE:
                notes.append(f"{name}: no controlnet_aux oracle (0.0.10 has no Depth Anything V2): ours alone")
            if name in NOTES:
                notes.append(f"{name}: {NOTES[name]}")
            if kind == "random" and name in RANDOM_NOTES:
                notes.append(f"{name}: {RANDOM_NOTES[name]}")
            gc.collect()
            common.release_free_memory()
    print()
    print(common.format_table(header, rows, left=2))
    print()
    print(
        "aux / policy: controlnet_aux's median time over ours through the runtime policy (above 1: ours "
        "faster). max |fp32 - aux|: the largest difference in levels (0..255) between our float32 map "
        "and controlnet_aux's, and how many values differ. policy vs fp32: mean difference in levels."
    )
    for note in notes:
        print(f"- {note}")
    print(f"total {time.perf_counter() - started:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
