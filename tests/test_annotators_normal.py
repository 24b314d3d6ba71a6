"""The normal annotator (``normal_bae``) against controlnet_aux's NormalBaeDetector on the same random
weights, saved as ``scannet.pt`` is: the weights under "model", every key prefixed "module.".

Random weights make meaningless normals, but the same ones through both implementations must give
the same map: the comparisons are exact (identical uint8 maps; measured: no pixel differs)."""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest
import torch
from skimage import data as photos

from controlnet.annotators import AnnotatorWeightsError, Runtime, run_annotator
from controlnet.annotators.normal import NORMAL_BAE_WEIGHTS

from . import annotator_weights
from .reference_annotators import at_own_size, aux_module


@pytest.fixture(scope="module")
def scannet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Runtime, dict[str, torch.Tensor]]:
    """A folder holding scannet.pt with random weights in the original's layout, and the weights."""
    folder = tmp_path_factory.mktemp("normal_weights")
    weights = annotator_weights.normal_bae()
    annotator_weights.write(folder, NORMAL_BAE_WEIGHTS.name, weights)
    return Runtime(folder, "cpu", "float32"), weights


@pytest.fixture(scope="module")
def reference(scannet: tuple[Runtime, dict[str, torch.Tensor]]):
    """controlnet_aux's NormalBaeDetector on the same weights."""
    detector = aux_module("normalbae")
    nnet = aux_module("normalbae.nets.NNET")
    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )  # the detector's own settings
    model = nnet.NNET(args)
    model.load_state_dict(scannet[1])
    return detector.NormalBaeDetector(model.eval())


def _photo(name: str, height: int, width: int) -> np.ndarray:
    image = getattr(photos, name)()
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize(("photo", "height", "width"), [("astronaut", 256, 256), ("coffee", 192, 256)])
def test_normal_bae_equals_controlnet_aux(scannet, reference, photo: str, height: int, width: int) -> None:
    image = _photo(photo, height, width)
    ours = run_annotator("normal_bae", image, None, runtime=scannet[0])
    theirs = at_own_size(reference, image)
    assert theirs.shape == ours.shape == (height, width, 3)
    # The per-pixel refinement layers run as matrix products over channels-last rows (the
    # reference: 1x1 Conv1d), which sums in another order: measured 2 values in 196,608 one level off.
    differ = ours.astype(int) - theirs
    assert np.abs(differ).max() <= 1 and np.count_nonzero(differ) <= ours.size // 10_000
    assert len(np.unique(ours)) > 20 and 0 < ours.mean() < 255  # the random network's map is not flat


def test_normal_bae_pads_other_sizes_as_the_extension_does(scannet) -> None:
    image = _photo("chelsea", 72, 100)
    padded = np.pad(image, ((0, 56), (0, 28), (0, 0)), mode="edge")
    ours = run_annotator("normal_bae", image, None, runtime=scannet[0])
    np.testing.assert_array_equal(ours, run_annotator("normal_bae", padded, None, runtime=scannet[0])[:72, :100])


def test_normal_bae_in_bfloat16_is_close_to_float32(scannet) -> None:
    image = _photo("astronaut", 128, 128)
    full = run_annotator("normal_bae", image, None, runtime=scannet[0])
    half = run_annotator("normal_bae", image, None, runtime=Runtime(scannet[0].folder, "cpu", "bfloat16"))
    difference = np.abs(full.astype(np.int16) - half)
    # measured on this machine's CPU: mean 0.18 levels, none more than 1 level off (bound: 99% of the
    # values within 2 levels, mean under 0.5, leaving room for other CPUs' bf16 kernels)
    assert difference.any() and difference.mean() < 0.5 and np.percentile(difference, 99) <= 2


def test_normal_bae_reads_safetensors(scannet, reference, tmp_path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({k: v.contiguous() for k, v in scannet[1].items()}, str(tmp_path / "scannet.safetensors"))
    image = _photo("chelsea", 64, 128)
    ours = run_annotator("normal_bae", image, None, runtime=Runtime(tmp_path))
    np.testing.assert_array_equal(ours, reference(image, detect_resolution=64, image_resolution=64, output_type="np"))


def _refused(folder) -> str:
    with pytest.raises(AnnotatorWeightsError) as refused:
        run_annotator("normal_bae", np.zeros((64, 64, 3), np.uint8), None, runtime=Runtime(folder))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_missing_scannet_pt_is_named_with_its_folder_and_source(tmp_path) -> None:
    message = _refused(tmp_path)
    assert "scannet.pt" in message and str(tmp_path) in message and NORMAL_BAE_WEIGHTS.source in message


def test_another_network_saved_as_scannet_pt_is_refused_naming_normal_bae(tmp_path) -> None:
    torch.save(
        {"block1.convs.0.weight": torch.zeros(64, 3, 3, 3), "norm": torch.zeros(1, 3, 1, 1)}, tmp_path / "scannet.pt"
    )
    message = _refused(tmp_path)
    assert "NormalBAE" in message and "conv_stem" in message


def test_a_scannet_pt_lacking_layers_is_refused(scannet, tmp_path) -> None:
    weights = {f"module.{k}": scannet[1][k] for k in NORMAL_BAE_WEIGHTS.markers}
    torch.save({"model": weights}, tmp_path / "scannet.pt")
    assert "keys missing" in _refused(tmp_path)  # 933, less the BatchNorm counters torch fills in


def test_a_corrupt_scannet_pt_is_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "scannet.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert "scannet.pt" in _refused(tmp_path)
