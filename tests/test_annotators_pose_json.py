"""Poses without a network: drawing them exactly as the ControlNet 1.1 pose models were trained
(the same pixels as controlnet_aux's open_pose drawing on the same keypoints), reading and writing
OpenPose JSON (the AUTOMATIC1111 extension's and CMU's), and the openpose_json annotator."""

from __future__ import annotations

import json
import types
from collections.abc import Iterator

import numpy as np
import pytest

from controlnet.annotators import ANNOTATORS, get_annotator
from controlnet.annotators.pose.draw import draw_poses
from controlnet.annotators.pose.jsonformat import parse_pose_json, poses_to_json, read_pose_json
from controlnet.annotators.pose.keypoints import Person, Poses
from controlnet.annotators.posejson import annotate_pose_json, render_pose_json

from .reference_annotators import aux_module, matplotlib_colors

FLAGS = [(True, False, False), (True, True, True), (False, True, False), (False, False, True), (True, True, False)]

# ------------------------------------------------------------------------------------------------
# Keypoints


def _part(rng: np.random.Generator, count: int, missing: float) -> np.ndarray:
    """`count` points spread a little beyond the canvas (edges and off-canvas points drawn as the
    reference draws them), about `missing` of them absent (NaN rows)."""
    points = np.column_stack([rng.uniform(-0.05, 1.05, count), rng.uniform(-0.05, 1.05, count), np.ones(count)])
    points[rng.random(count) < missing] = np.nan
    return points


def _people(rng: np.random.Generator, count: int) -> list[Person]:
    return [
        Person(_part(rng, 18, 0.2), _part(rng, 21, 0.2), _part(rng, 21, 0.2), _part(rng, 70, 0.2)) for _ in range(count)
    ]


def _on_canvas(people: list[Person]) -> list[Person]:
    """The people with every point moved onto the canvas, as a detector finds them."""
    for person in people:
        for part in (person.body, person.left_hand, person.right_hand, person.face):
            if part is not None:
                part[:, :2] = part[:, :2].clip(0, 1)
    return people


def _same(a: Poses, b: Poses) -> None:
    assert (a.width, a.height, len(a.people)) == (b.width, b.height, len(b.people))
    for pa, pb in zip(a.people, b.people, strict=True):
        for field in ("body", "left_hand", "right_hand", "face"):
            x, y = getattr(pa, field), getattr(pb, field)
            assert (x is None) == (y is None), field
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=field)


# ------------------------------------------------------------------------------------------------
# Drawing against controlnet_aux


@pytest.fixture(scope="module")
def aux_pose() -> Iterator[types.SimpleNamespace]:
    """controlnet_aux's open_pose drawing (the A1111 extension's, and the nightly's for one
    person), with a stand-in for the one matplotlib function its hand drawing calls where
    matplotlib is absent."""
    with matplotlib_colors():
        module = aux_module("open_pose")
        yield types.SimpleNamespace(draw=module.draw_poses, result=module.PoseResult, body=aux_module("open_pose.body"))


def _aux_poses(aux: types.SimpleNamespace, people: list[Person], width: int, height: int) -> list:
    """Our people as controlnet_aux's PoseResults: absent body points None; absent hand and face
    points at (-1, -1) pixels, as its detector leaves them (its hand drawing takes no None)."""

    def points(part: np.ndarray | None, absent_none: bool) -> list | None:
        if part is None:
            return None
        off = None if absent_none else aux.body.Keypoint(-1 / width, -1 / height)
        return [off if np.isnan(x) else aux.body.Keypoint(x, y) for x, y, _ in part]

    return [
        aux.result(
            aux.body.BodyResult(points(p.body, True), 0.0, 0),
            points(p.left_hand, False),
            points(p.right_hand, False),
            points(p.face, False),
        )
        for p in people
    ]


@pytest.mark.parametrize(("width", "height"), [(512, 512), (704, 448), (97, 211)])
def test_drawing_equals_controlnet_aux_pixel_for_pixel(aux_pose, width: int, height: int) -> None:
    # Random people (none to three, overlapping), a fifth of their points absent, some on and
    # beyond the canvas edges; every combination of parts. Identical uint8 maps required.
    rng = np.random.default_rng(width)
    for _ in range(12):
        people = _people(rng, int(rng.integers(0, 4)))
        reference_people = _aux_poses(aux_pose, people, width, height)
        for body, hands, face in FLAGS:
            ours = draw_poses(Poses(width, height, people), body=body, hands=hands, face=face)
            expected = aux_pose.draw(reference_people, height, width, body, hands, face)
            assert ours.dtype == np.uint8 and ours.shape == (height, width, 3)
            np.testing.assert_array_equal(ours, expected, err_msg=f"{len(people)} people {body, hands, face}")


def test_drawing_a_full_pose_uses_the_trained_colours_and_sizes() -> None:
    body = np.full((18, 3), np.nan)
    body[1] = (0.5, 0.3, 1)  # neck
    body[2] = (0.3, 0.3, 1)  # right shoulder
    canvas = draw_poses(Poses(200, 100, [Person(body=body)]))
    assert tuple(canvas[30, 100]) == (255, 85, 0)  # the neck's joint: colour 1
    assert tuple(canvas[30, 80]) == (153, 0, 0)  # the neck-shoulder limb: colour 0 at 60 %
    assert tuple(canvas[30, 60]) == (255, 170, 0)  # the shoulder's joint: colour 2
    assert canvas[36:, :].max() == 0 and canvas[:, :55].max() == 0  # nothing beyond radius 4 / stick 4


def test_drawing_nothing_gives_a_black_canvas_of_the_size() -> None:
    empty = draw_poses(Poses(33, 17, [Person()]), body=True, hands=True, face=True)
    assert empty.shape == (17, 33, 3) and empty.max() == 0


@pytest.mark.parametrize(
    ("poses", "match"),
    [
        (Poses(0, 64), "width must be 1 to 8192"),
        (Poses(64, 9000), "height must be 1 to 8192"),
        (Poses(64, 64, [Person(body=np.zeros((17, 3)))]), r"body must be an \(18, 3\) array"),
        (Poses(64, 64, [Person(body=np.full((18, 3), 5000.0))]), "1000 canvases away"),
        (Poses(64, 64, ["person"]), "Person objects"),  # type: ignore[list-item]
    ],
)
def test_drawing_rejects_bad_poses(poses: Poses, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        draw_poses(poses)


# ------------------------------------------------------------------------------------------------
# OpenPose JSON

EDITOR_JSON = {  # the shape of the A1111 pose editor's file: pixels, absent points 0, 0, 0
    "people": [
        {
            "pose_keypoints_2d": [275.25, 196.3, 1, 303.3, 272.7, 1, 244.9, 292.1, 1, *[0, 0, 0] * 15],
            "hand_left_keypoints_2d": None,
            "hand_right_keypoints_2d": [],
            "face_keypoints_2d": [100.5, 80.25, 1] * 70,
        }
    ],
    "canvas_width": 512,
    "canvas_height": 768,
}


def test_reading_the_editor_format_in_pixels() -> None:
    poses = read_pose_json(json.dumps(EDITOR_JSON))
    assert (poses.width, poses.height, len(poses.people)) == (512, 768, 1)
    person = poses.people[0]
    np.testing.assert_allclose(person.body[0], (275.25 / 512, 196.3 / 768, 1), rtol=1e-15)
    assert np.isnan(person.body[3:]).all()  # 0, 0, 0 is absent
    assert person.left_hand is None and person.right_hand is None  # null and [] are no hand
    np.testing.assert_allclose(person.face[:, :2], np.tile((100.5 / 512, 80.25 / 768), (70, 1)), rtol=1e-15)


def test_normalised_and_pixel_files_of_one_pose_draw_the_same() -> None:
    # 512 x 512: pixel / 512 is exact, so the two files hold the very same pose.
    poses = Poses(512, 512, _on_canvas(_people(np.random.default_rng(3), 2)))
    normalised = poses_to_json(poses)
    pixels = json.loads(json.dumps(normalised))
    for person in pixels["people"]:
        for key, numbers in person.items():
            person[key] = [v * 512 if i % 3 < 2 else v for i, v in enumerate(numbers)]
    assert max(normalised["people"][0]["pose_keypoints_2d"]) == 1.0 < max(pixels["people"][0]["pose_keypoints_2d"])
    a = render_pose_json(json.dumps(normalised))
    np.testing.assert_array_equal(render_pose_json(json.dumps(pixels)), a)
    np.testing.assert_array_equal(draw_poses(poses, hands=True, face=True), a)
    narrow = render_pose_json(json.dumps(normalised | {"canvas_width": 256}))
    np.testing.assert_array_equal(narrow, draw_poses(Poses(256, 512, poses.people), hands=True, face=True))


def test_whole_pixel_coordinates_are_drawn_at_those_pixels() -> None:
    # The extension draws pixel files at int(pixel). On a 704-wide canvas, 28 of the 705 whole
    # pixels p give p / 704 * 704 < p (the first ones here); reading keeps them at p, not p - 1.
    for x in (15, 30, 49, 60, 98, 109, 120, 185, 196, 207, 218, 359, 370, 381, 392, 403, 414, 5, 100, 512, 699):
        assert x / 704 * 704 < x or x in (5, 100, 512, 699)  # the first ones are the short ones
        doc = {"people": [{"pose_keypoints_2d": [x, 7, 1] + [0, 0, 0] * 17}], "canvas_width": 704, "canvas_height": 33}
        canvas = render_pose_json(json.dumps(doc))
        columns = np.flatnonzero(canvas.any(axis=(0, 2)))
        assert (columns.min(), columns.max()) == (x - 4, x + 4), x  # the joint's circle, radius 4, centred on x


def test_a_point_of_confidence_zero_is_absent_and_others_are_kept() -> None:
    body = [0.5, 0.5, 0.0, 0.2, 0.2, 0.3, 0.4, 0.4, 1] + [0, 0, 0] * 15
    person = read_pose_json(
        json.dumps({"people": [{"pose_keypoints_2d": body}], "canvas_width": 8, "canvas_height": 8})
    )
    assert np.isnan(person.people[0].body[0]).all()
    np.testing.assert_array_equal(person.people[0].body[1:3], [[0.2, 0.2, 0.3], [0.4, 0.4, 1]])


def test_a_person_of_null_or_empty_parts_and_cmus_extra_keys_is_read_as_nothing_detected() -> None:
    # The refusal of a person with none of the four keys (BAD_JSON) leaves these alone: the parts
    # given as null or [] (the extension writes null for a part not detected), CMU's other keys.
    people = [
        {"pose_keypoints_2d": None, "hand_left_keypoints_2d": [], "hand_right_keypoints_2d": None},
        {"face_keypoints_2d": [], "person_id": [-1], "pose_keypoints_3d": [], "face_keypoints_3d": []},
        {"pose_keypoints_2d": [0.5, 0.5, 1] * 18, "hand_left_keypoints_3d": [1, 2, 3, 1]},
    ]
    poses = read_pose_json(json.dumps({"people": people, "canvas_width": 64, "canvas_height": 64}))
    for person in poses.people[:2]:
        assert all(getattr(person, f) is None for f in ("body", "left_hand", "right_hand", "face"))
    np.testing.assert_array_equal(poses.people[2].body, [[0.5, 0.5, 1]] * 18)
    assert poses.people[2].left_hand is None and poses.people[2].face is None


def test_cmu_body_25_is_reduced_to_the_18_coco_points(tmp_path) -> None:
    # CMU's default model writes 25 points: MidHip at 8 and six foot points at 19-24; no canvas size.
    points = np.arange(75, dtype=float).reshape(25, 3) + 1
    path = tmp_path / "cmu_keypoints.json"
    path.write_text(
        json.dumps({"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": list(points.ravel())}]})
    )
    with pytest.raises(ValueError, match="no canvas_width and canvas_height"):
        read_pose_json(path)
    poses = read_pose_json(str(path), canvas=(100, 200))
    expected = points[[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    np.testing.assert_allclose(poses.people[0].body[:, 2], expected[:, 2])
    np.testing.assert_allclose(poses.people[0].body[:, 0] * 100, expected[:, 0], rtol=1e-14)
    assert render_pose_json(path, 60, 40).shape == (40, 60, 3)


def test_writing_then_reading_gives_the_same_poses() -> None:
    rng = np.random.default_rng(5)
    people = _on_canvas([*_people(rng, 3), Person(body=_part(rng, 18, 0.5))])
    poses = Poses(640, 384, people)
    doc = poses_to_json(poses)
    assert set(doc) == {"people", "animals", "canvas_width", "canvas_height"}
    assert doc["people"][3]["face_keypoints_2d"] is None
    assert set(doc["people"][0]["pose_keypoints_2d"][2::3]) <= {0.0, 1.0}  # the extension reads c == 1 only
    _same(read_pose_json(json.dumps(doc)), poses)
    people[0].body[~np.isnan(people[0].body[:, 0]), 2] = 0.25
    _same(read_pose_json(json.dumps(poses_to_json(poses, confidences=True))), poses)


def test_a_pose_beyond_the_canvas_is_written_in_pixels_and_draws_the_same() -> None:
    rng = np.random.default_rng(6)
    poses = Poses(704, 448, _people(rng, 2))
    poses.people[0].body[0, :2] = (1.4, 0.5)  # normalised, a reader would take this part for pixels
    doc = poses_to_json(poses)
    assert doc["people"][0]["pose_keypoints_2d"][0] == pytest.approx(1.4 * 704)
    again = read_pose_json(json.dumps(doc))
    for a, b in zip(again.people, poses.people, strict=True):
        np.testing.assert_allclose(a.body, b.body, rtol=1e-14)
    for body, hands, face in FLAGS:
        np.testing.assert_array_equal(
            draw_poses(again, body=body, hands=hands, face=face), draw_poses(poses, body=body, hands=hands, face=face)
        )


def test_a_list_of_one_pose_object_is_read_as_the_extension_api_takes_it() -> None:
    _same(parse_pose_json([EDITOR_JSON]), parse_pose_json(EDITOR_JSON))
    with pytest.raises(ValueError, match="list of 2 poses; one image takes one"):
        parse_pose_json([EDITOR_JSON, EDITOR_JSON])


def _with(**changes: object) -> str:
    doc = json.loads(json.dumps(EDITOR_JSON))
    person = changes.pop("person", None)
    if person is not None:
        doc["people"][0].update(person)
    doc.update(changes)
    return json.dumps(doc)


BAD_JSON = {
    "not JSON": ("{'people': []}", "not JSON"),
    "not an object": ("[1, 2]", "list of 2 poses"),
    "a number": ("[3]", "must be an OpenPose JSON object with 'people', got int"),
    "no people": ('{"canvas_width": 64, "canvas_height": 64}', "'people' must be a list of people, got null"),
    "people not a list": (_with(people={"a": 1}), "'people' must be a list"),
    "person not an object": (_with(people=[[1, 2, 3]]), r"people\[0\] must be an object"),
    "no canvas height": (json.dumps({"people": [], "canvas_width": 64}), "no 'canvas_height'"),
    "canvas of 0 pixels": (_with(canvas_width=0), "canvas_width must be a whole number of pixels from 1 to 8192"),
    "canvas too large": (_with(canvas_height=100000), "canvas_height must be a whole number of pixels from 1 to 8192"),
    "canvas fractional": (_with(canvas_width=511.5), "canvas_width must be a whole number"),
    "canvas a string": (_with(canvas_width="512"), "canvas_width must be a whole number"),
    "canvas true": (_with(canvas_width=True), "canvas_width must be a whole number"),
    "body too short": (_with(person={"pose_keypoints_2d": [1.0] * 51}), r"pose_keypoints_2d must be a list of 54"),
    "hand wrong length": (_with(person={"hand_left_keypoints_2d": [1.0] * 60}), "must be a list of 63 numbers"),
    "face wrong length": (_with(person={"face_keypoints_2d": [1.0] * 204}), "must be a list of 210 numbers"),
    "body a string": (_with(person={"pose_keypoints_2d": "1,2,3"}), "must be a list of 54 numbers .* got str"),
    "NaN": ('{"people": [{"pose_keypoints_2d": [NaN' + ", 1" * 53 + "]}]}", "NaN is not a number JSON allows"),
    "Infinity": (_with().replace("275.25", "Infinity"), "Infinity is not a number JSON allows"),
    "huge number": (_with().replace("275.25", "1e999"), r"pose_keypoints_2d\[0\] must be a finite number, got inf"),
    "huge integer": (_with().replace("275.25", "9" * 400), r"pose_keypoints_2d\[0\] must be a finite number"),
    "huge canvas integer": (_with(canvas_width=10**400), "canvas_width must be a whole number"),
    "a string number": (_with().replace("275.25", '"275"'), r"pose_keypoints_2d\[0\] must be a finite number"),
    "null number": (_with().replace("275.25", "null"), r"pose_keypoints_2d\[0\] must be a finite number, got None"),
    "far away": (_with().replace("275.25", "1e9"), "more than 1000 canvas sizes away"),
    "animals": (_with(animals=[[1, 2, 1] * 17]), "animal poses, which are not supported"),
    "person empty": (
        json.dumps({"people": [{}], "canvas_width": 64, "canvas_height": 64}),
        r"^pose JSON: people\[0\] has none of pose_keypoints_2d, hand_left_keypoints_2d, "
        r"hand_right_keypoints_2d, face_keypoints_2d \(null or \[\] for a part not detected\); it is empty$",
    ),
    "person's key misspelled": (
        _with(people=[EDITOR_JSON["people"][0], {"pose_keypoints": [0.5, 0.5, 1] * 18, "person_id": [-1]}]),
        r"people\[1\] has none of pose_keypoints_2d, .*face_keypoints_2d .*; it has 'pose_keypoints', 'person_id'$",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_pose_json_is_refused_in_one_line(case: str) -> None:
    text, match = BAD_JSON[case]
    with pytest.raises(ValueError, match=match) as refused:
        read_pose_json(text)
    assert "\n" not in str(refused.value)


def test_bad_pose_files_are_refused_in_one_line(tmp_path) -> None:
    for path, content, match in [
        (tmp_path / "missing.json", None, "missing.json: no such file"),
        (tmp_path / "binary.json", b"\xff\xfe\x00", "binary.json: not JSON"),
        (tmp_path / "empty.json", b"", "empty.json: not JSON"),
        (tmp_path / "short.json", _with(canvas_width=0).encode(), "short.json: canvas_width must be"),
    ]:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=match) as refused:
            read_pose_json(path)
        assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="file path or JSON text"):
        read_pose_json(12)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# The openpose_json annotator


def test_openpose_json_is_registered_and_reads_a_file_not_an_image(tmp_path) -> None:
    annotator = get_annotator("openpose_json")
    assert ANNOTATORS["openpose_json"] is annotator and not annotator.weights
    assert get_annotator("openpose_json").from_file is not None
    with pytest.raises(ValueError, match="draws an OpenPose JSON file, not an image") as refused:
        annotator(np.zeros((64, 64, 3), np.uint8))
    assert "\n" not in str(refused.value)


def test_openpose_json_draws_body_hands_and_face_at_the_canvas_or_the_given_size(tmp_path) -> None:
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(EDITOR_JSON))
    full = get_annotator("openpose_json").from_file(path)
    assert full.image.shape == (768, 512, 3) and full.image.dtype == np.uint8
    _same(parse_pose_json(full.data), read_pose_json(path))  # the poses, to edit and render back
    poses = read_pose_json(path)
    np.testing.assert_array_equal(full.image, draw_poses(poses, body=True, hands=True, face=True))
    body_only = render_pose_json(path, draw_hand=False, draw_face=False)
    np.testing.assert_array_equal(body_only, draw_poses(poses))
    small = annotate_pose_json(str(path), 256, 384)
    np.testing.assert_array_equal(small.image, draw_poses(Poses(256, 384, poses.people), hands=True, face=True))
    with pytest.raises(ValueError, match="both width and height"):
        render_pose_json(path, 256)
    with pytest.raises(ValueError, match="parameter 'draw_face' must be true or false"):
        annotate_pose_json(path, draw_face="yes")
    with pytest.raises(ValueError, match="width must be 1 to 8192"):
        render_pose_json(path, 0, 64)
