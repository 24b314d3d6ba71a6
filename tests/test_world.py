"""The synthetic world: determinism, every condition's ground truth, captions and ``controlnet data world``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion

from controlnet.annotators import run_annotator
from controlnet.annotators.maps import ADE20K_PALETTE
from controlnet.annotators.pose.draw import draw_poses
from controlnet.annotators.pose.jsonformat import read_pose_json
from controlnet.cli import main
from controlnet.datasets.folders import ControlDataset, read_records
from controlnet.datasets.synthetic import SCENE_COLORS
from controlnet.datasets.world import AMBIENT, CLASSES, CONDITIONS, _bae_normal_map, world_sample, write_world
from controlnet.datasets.world_captions import NOUNS, phrasing_count
from controlnet.datasets.world_render import Camera, render

SIZE = 64


@pytest.fixture(scope="module")
def samples():
    return [world_sample(i, size=SIZE, seed=5) for i in range(40)]


def _mask(sample, obj):
    """Where `obj` shows (its instance)."""
    return sample.instance == obj["instance"]


def test_samples_are_deterministic_from_seed_and_index():
    a, b = world_sample(3, size=SIZE, seed=1), world_sample(3, size=SIZE, seed=1)
    assert a.prompt == b.prompt and a.scene == b.scene and np.array_equal(a.image, b.image)
    assert all(np.array_equal(a.conditions[c], b.conditions[c]) for c in CONDITIONS)
    assert not np.array_equal(a.image, world_sample(3, size=SIZE, seed=2).image)
    assert not np.array_equal(a.image, world_sample(4, size=SIZE, seed=1).image)
    assert a.image.shape == (SIZE, SIZE, 3) and a.image.dtype == np.uint8
    assert all(a.conditions[c].shape == (SIZE, SIZE, 3) and a.conditions[c].dtype == np.uint8 for c in CONDITIONS)


def test_canny_is_the_canny_annotator_on_the_image(samples):
    for s in samples[:5]:
        expected = run_annotator("canny", s.image, low_threshold=100, high_threshold=200)
        assert np.array_equal(s.conditions["canny"], expected)


def test_seg_holds_the_wall_floor_and_each_objects_class_where_it_is(samples):
    assert tuple(ADE20K_PALETTE[CLASSES["wall"][0]]) == (120, 120, 120)  # mmseg's ADE20k: 0 wall
    assert tuple(ADE20K_PALETTE[CLASSES["person"][0]]) == (150, 5, 61)  # 12 person
    for s in samples:
        seg = s.conditions["seg"]
        assert (seg[0] == ADE20K_PALETTE[0]).all()  # the top row: the wall
        assert (seg[-1] == ADE20K_PALETTE[CLASSES["floor"][0]]).any()
        for obj in s.scene["objects"]:
            assert obj["seg_class"] == CLASSES[obj["kind"]][0]
            mask = _mask(s, obj)
            assert mask.sum() == obj["pixels"] > 0
            assert (s.conditions["seg"][mask] == ADE20K_PALETTE[obj["seg_class"]]).all()
            ys, xs = np.nonzero(mask)
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # Inside the object, the image holds its colour, shaded (ambient to full light, never brighter).
            inner = binary_erosion(_mask(s, obj))
            if inner.sum() >= 5:
                median = np.median(s.image[inner].astype(float), axis=0)
                base = np.array(SCENE_COLORS[obj["color"]], float)
                assert (median <= base + 1).all() and (median >= AMBIENT * base - 1).all(), (obj, median)


def test_depth_is_brighter_for_the_nearer_object(samples):
    checked = 0
    for s in samples:
        solids = [o for o in s.scene["objects"] if o["category"] != "flat" and o["pixels"] > 30]
        for a in solids:
            for b in solids:
                if a["distance"] < b["distance"] - 1.0:
                    depth = s.conditions["depth"][:, :, 0].astype(float)
                    assert depth[_mask(s, a)].mean() > depth[_mask(s, b)].mean(), (a, b)
                    checked += 1
        depth = s.conditions["depth"]
        assert (depth == depth[:, :, :1]).all() and depth.max() == 255 and depth.min() == 0
        assert depth[-1].mean() > depth[0].mean()  # the floor at the bottom is nearer than the wall
    assert checked >= 5


def test_normals_face_the_viewer_and_a_sphere_points_outward():
    camera = Camera()
    sphere = {"kind": "sphere", "center": (0.0, 0.7, 1.0), "radius": 0.5, "instance": 1}
    buffers, rays = render([sphere], camera, 64)
    hit = np.isfinite(buffers.t)
    points = camera.eye + buffers.t[hit, None] * rays[hit]
    outward = (points - sphere["center"]) / 0.5
    assert hit.sum() > 50 and np.allclose(buffers.normal[hit], outward)
    assert ((buffers.normal[hit] * rays[hit]).sum(axis=1) < 0).all()  # toward the camera
    s = world_sample(0, size=SIZE, seed=5)
    normal = s.conditions["normal"].astype(int)
    assert (normal[0] == normal[0, 0]).all() and normal[0, 0, 2] >= 250  # the wall faces the viewer: blue
    assert abs(normal[0, 0, 0] - 127) <= 1 and normal[-1, 0, 1] > 200  # the floor faces up: green
    # normal_bae's convention: red grows toward the image's left (a sphere's left rim is red)
    camera_normals = camera.to_camera(buffers.normal[hit])
    encoded = _bae_normal_map(camera_normals[None])[0].astype(int)
    facing_right, facing_left = camera_normals[:, 0] > 0.5, camera_normals[:, 0] < -0.5
    assert facing_right.any() and facing_left.any()
    assert (encoded[facing_right, 0] <= 63).all() and (encoded[facing_left, 0] >= 191).all()


def test_pose_keypoints_land_on_the_figures_and_the_map_is_draw_poses(samples):
    with_people = [s for s in samples if any(o["kind"] == "person" for o in s.scene["objects"])]
    assert with_people
    for s in with_people:
        assert np.array_equal(s.conditions["pose"], draw_poses(s.poses))
        person = ADE20K_PALETTE[CLASSES["person"][0]]
        figure = (s.conditions["seg"] == person).all(axis=2)
        for p in s.poses.people:
            xy = p.body[np.isfinite(p.body[:, 0]), :2]
            pixels = (xy * SIZE).astype(int)
            near = [figure[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].any() for x, y in pixels]
            assert np.mean(near) >= 0.8, (s.prompt, np.mean(near))
            # Person's right shoulder on the image's left: the figure faces the camera.
            assert p.body[2, 0] < p.body[5, 0]
    empty = [s for s in samples if not s.poses.people]
    assert empty and not empty[0].conditions["pose"].any()


def test_scribble_strokes_follow_the_outlines(samples):
    for s in samples[:10]:
        strokes = s.conditions["scribble"][:, :, 0] > 0
        edges = s.conditions["canny"][:, :, 0] > 0
        assert strokes.any() and strokes.mean() < 0.4
        # Most Canny edges (the outlines) lie within a few pixels of a stroke.
        assert (binary_dilation(strokes, iterations=3) & edges).sum() >= 0.8 * edges.sum()


def test_captions_name_every_object_and_both_colours(samples):
    for s in samples:
        text = s.prompt.lower().replace("grey", "gray")
        assert s.scene["background"] in text and s.scene["floor"] in text
        for obj in s.scene["objects"]:
            assert obj["color"] in text
            assert any(noun in text for noun in NOUNS[obj["kind"]]), (s.prompt, obj)
    assert len({s.prompt.split()[0].lower() for s in samples}) > 5  # phrasings vary
    scene = {"background": "red", "floor": "blue", "objects": [{"kind": "cone", "color": "green"}]}
    assert phrasing_count(scene) == 32  # 8 templates x articles or none x a capital or not
    two = {
        "background": "gray",
        "floor": "blue",
        "objects": [{"kind": "cube", "color": "red"}, {"kind": "cone", "color": "green"}],
    }
    assert phrasing_count(two) == 8 * 2 * 2 * 2 * 2 * 3  # x "and" or commas x grey/gray x cube/box/block


def test_cli_writes_a_dataset_training_reads(tmp_path, capsys):
    out = tmp_path / "world"
    assert main(["data", "world", "--out", str(out), "--count", "3", "--size", "64", "--seed", "2"]) in (0, None)
    records = read_records(out)
    assert len(records) == 3 and all(r.source.is_file() and r.target.is_file() for r in records)
    assert set(records[0].extra["conditions"]) == set(CONDITIONS)
    assert records[0].extra["scene"] == json.loads(json.dumps(world_sample(0, size=64, seed=2).scene))
    for condition in CONDITIONS:
        data = ControlDataset(out / condition, resolution=64)
        item = data[1]
        assert item["hint"].shape == (3, 64, 64) and data.prompt(1) == records[1].prompt
    read_pose_json(out / "pose" / "0.json")
    assert main(["data", "world", "--out", str(tmp_path / "bad"), "--count", "1", "--size", "30"]) != 0
    assert "--size" in capsys.readouterr().err


def test_write_world_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="count"):
        write_world(tmp_path / "a", 0)
    with pytest.raises(ValueError, match="seed"):
        write_world(tmp_path / "a", 1, seed=-1)


def _digest(folder, skip: str) -> str:
    """SHA-256 of every file under `folder` but those in `skip`/: names, decoded pixels, other bytes."""
    import hashlib

    from PIL import Image

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name != skip):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(np.asarray(Image.open(path)).tobytes() if path.suffix == ".png" else path.read_bytes())
    return digest.hexdigest()


def test_instance_maps_are_added_without_changing_any_other_output(tmp_path):
    """instance/N.png came later (for the evaluation): every other file of a seed's dataset is as
    it was before (the digest was taken before instance maps existed, and again when the normal
    maps took normal_bae's x direction, their one deliberate change since)."""
    from PIL import Image

    out = tmp_path / "world"
    write_world(out, 3, size=64, seed=2)
    assert _digest(out, skip="instance") == "8993ffefdd025cd6b09f82ff7b135dcdd9b9bb286a01a5ffee586d1d584c414e"
    for i, record in enumerate(read_records(out)):
        instance = np.asarray(Image.open(out / "instance" / f"{i}.png"))
        assert np.array_equal(instance, world_sample(i, size=64, seed=2).instance)
        ids = {o["instance"] for o in record.extra["scene"]["objects"]}
        assert set(np.unique(instance)) == {0, 1} | ids
