"""Training data: the synthetic generators, the dataset reader and the ``controlnet data`` command."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.annotators import run_annotator
from controlnet.cli import main
from controlnet.datasets.folders import (
    ControlDataset,
    DatasetError,
    DataWarning,
    detect_format,
    load_dataset,
    read_records,
    square_crop,
)
from controlnet.datasets.synthetic import (
    FILL50K_COLORS,
    SCENE_COLORS,
    SCENE_SHAPES,
    fill50k_sample,
    generate,
    scene_caption,
    scene_sample,
    write_dataset,
)

# -- generators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["fill50k", "scenes"])
def test_generators_are_deterministic_from_the_seed_and_differ_across_seeds(task):
    a, b = generate(task, 3, size=64, seed=7), generate(task, 3, size=64, seed=7)
    assert np.array_equal(a.source, b.source) and np.array_equal(a.target, b.target) and a.prompt == b.prompt
    others = [generate(task, 3, size=64, seed=8), generate(task, 4, size=64, seed=7)]
    assert all(not np.array_equal(a.target, o.target) for o in others)
    assert a.source.shape == a.target.shape == (64, 64, 3)
    assert a.source.dtype == a.target.dtype == np.uint8


def test_fill50k_prompts_name_palette_colours_and_match_the_images():
    assert FILL50K_COLORS["pale golden rod"] == (238, 232, 170) and "old lace" in FILL50K_COLORS
    assert all(name == name.lower() and "_" not in name for name in FILL50K_COLORS)
    for i in range(20):
        sample = fill50k_sample(i, size=64)
        match = re.fullmatch(r"(.+) circle with (.+) background", sample.prompt)
        assert match, sample.prompt
        circle, background = match.groups()
        assert circle != background and {circle, background} <= FILL50K_COLORS.keys()
        # The circle lies inside the image, so the corners are background; and it is filled with its colour.
        assert tuple(sample.target[0, 0]) == FILL50K_COLORS[background]
        assert (sample.target == FILL50K_COLORS[circle]).all(axis=2).sum() > 50
        # The source: an outline on black, nothing inside or outside it.
        assert tuple(sample.source[0, 0]) == (0, 0, 0) and 0 < (sample.source.max(axis=2) > 0).mean() < 0.2


def test_scene_captions_follow_the_metadata_and_the_images():
    for i in range(40):
        sample = scene_sample(i, size=64)
        scene = sample.scene
        objects = scene["objects"]
        assert 1 <= len(objects) <= 3 and sample.prompt == scene_caption(scene)
        colours = [scene["background"]] + [o["color"] for o in objects]
        assert len(set(colours)) == len(colours) and set(colours) <= SCENE_COLORS.keys()
        assert sample.prompt.endswith(f"{scene['background']} background")
        words = [f"{o['color']} {o['shape']}" for o in objects]
        positions = [sample.prompt.index(w) for w in words]
        assert positions == sorted(positions)  # listed in the metadata's order: left to right
        centres = [o["bbox"][0] + o["bbox"][2] for o in objects]
        assert centres == sorted(centres)
        for o in objects:
            assert o["shape"] in SCENE_SHAPES
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 >= 8  # visible at 64 px
            # The named colour really is there, and the shape's outline is in the edge map.
            inside = sample.target[y0:y1, x0:x1]
            assert (inside == SCENE_COLORS[o["color"]]).all(axis=2).mean() > 0.1, (i, o)
            assert sample.source[y0:y1, x0:x1].any()
        assert tuple(sample.target[0, 0]) == SCENE_COLORS[scene["background"]]  # shapes keep off the border


def test_scene_articles_and_lists():
    scene = {
        "background": "orange",
        "objects": [
            {"shape": "circle", "color": "red"},
            {"shape": "square", "color": "blue"},
            {"shape": "star", "color": "orange"},
        ],
    }
    assert scene_caption(scene) == "a red circle, a blue square and an orange star on an orange background"
    scene["objects"] = scene["objects"][:2]
    assert scene_caption(scene) == "a red circle and a blue square on an orange background"


@pytest.mark.parametrize("size", [64, 128])
def test_scene_source_is_the_canny_map_of_the_target(size):
    for i in range(3):
        sample = scene_sample(i, size=size)
        assert np.array_equal(sample.source, run_annotator("canny", sample.target))
        assert set(np.unique(sample.source)) <= {0, 255}


def test_generator_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of 8"):
        scene_sample(0, size=60)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        fill50k_sample(0, size=64, seed=-1)
    with pytest.raises(ValueError, match="unknown task"):
        generate("squares", 0)


# -- writing ------------------------------------------------------------------------------------


def test_write_dataset_writes_the_fill50k_layout_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "scenes"
    prompt_file = write_dataset(out, "scenes", 5, size=64, seed=3)
    lines = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    assert [line["source"] for line in lines] == [f"source/{i}.png" for i in range(5)]
    for i, line in enumerate(lines):
        sample = scene_sample(i, size=64, seed=3)
        assert line["prompt"] == sample.prompt and line["scene"] == sample.scene
        assert np.array_equal(np.asarray(Image.open(out / line["target"])), sample.target)
        assert np.array_equal(np.asarray(Image.open(out / line["source"])), sample.source)
    with pytest.raises(FileExistsError, match=r"already holds a dataset \(prompt\.json\)"):
        write_dataset(out, "scenes", 2, size=64)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "metadata.jsonl").write_text("")
    with pytest.raises(FileExistsError, match=r"already holds a dataset \(metadata\.jsonl\)"):
        write_dataset(tmp_path / "hf", "scenes", 2, size=64)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["metadata.jsonl"]
    fill = [
        json.loads(line) for line in write_dataset(tmp_path / "fill", "fill50k", 2, size=64).read_text().splitlines()
    ]
    assert set(fill[0]) == {"source", "target", "prompt"}


def test_an_interrupted_write_leaves_no_prompt_json(tmp_path):
    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, "scenes", 4, size=64, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "target"]
    write_dataset(tmp_path, "scenes", 4, size=64)  # a rerun into the same folder completes
    assert len(ControlDataset(tmp_path, 64)) == 4


# -- reading ------------------------------------------------------------------------------------


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def _lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_fill50k_folder_loads_with_the_right_shapes_and_ranges(tmp_path):
    write_dataset(tmp_path, "fill50k", 3, size=64)
    data = ControlDataset(tmp_path, resolution=64)
    assert data.format == "fill50k" and len(data) == 3 and data.prompts()[0] == fill50k_sample(0, size=64).prompt
    item = data[1]
    assert item["hint"].shape == item["image"].shape == (3, 64, 64)
    assert item["hint"].dtype == item["image"].dtype == torch.float32
    assert (
        item["hint"].min() >= 0 and item["hint"].max() <= 1 and item["image"].min() >= -1 and item["image"].max() <= 1
    )
    assert item["index"] == 1 and item["prompt"] == fill50k_sample(1, size=64).prompt
    sample = fill50k_sample(1, size=64)
    assert torch.equal(item["image"], torch.from_numpy(sample.target).permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(item["hint"], torch.from_numpy(sample.source).permute(2, 0, 1).float() / 255)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2, num_workers=0)))
    assert batch["hint"].shape == (2, 3, 64, 64) and batch["prompt"] == data.prompts()[:2]


def test_the_fingerprint_changes_with_the_data_and_nothing_else(tmp_path):
    write_dataset(tmp_path, "scenes", 3, size=32)
    data = load_dataset(tmp_path, 32)
    before = data.fingerprint()
    assert before == ControlDataset(tmp_path, 32).fingerprint() and data.prompt(2) == data.prompts()[2]
    _save(tmp_path / "target" / "1.png", np.zeros((40, 32, 3)))
    assert data.fingerprint() != before


def test_a_diffusers_folder_loads_with_configurable_columns(tmp_path):
    _save(tmp_path / "images" / "a.png", np.full((32, 32, 3), 255))
    _save(tmp_path / "hints" / "a.png", np.zeros((32, 32)))  # greyscale: read as RGB
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "images" / "b.png")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).convert("P").save(tmp_path / "hints" / "b.png")
    _lines(
        tmp_path / "metadata.jsonl",
        [
            {"target": "images/a.png", "edges": "hints/a.png", "caption": "white", "score": 1},
            {"target": "images/b.png", "edges": "hints/b.png", "caption": "red"},
        ],
    )
    assert detect_format(tmp_path) == "diffusers"
    with pytest.raises(DatasetError, match=r"line 1: missing 'conditioning_image', 'image', 'text'"):
        ControlDataset(tmp_path, 32)
    data = ControlDataset(
        tmp_path, 16, image_column="target", conditioning_image_column="edges", caption_column="caption"
    )
    assert data.prompts() == ["white", "red"] and data.records[0].extra == {"score": 1}
    first, second = data[0], data[1]
    assert first["hint"].shape == (3, 16, 16) and torch.all(first["hint"] == 0) and torch.all(first["image"] == 1)
    assert torch.all(second["image"][0] == 1) and torch.all(second["image"][1:] == -1)


def test_hugging_face_file_name_column_stands_for_image(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3)))
    _save(tmp_path / "c.png", np.zeros((8, 8, 3)))
    _lines(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "conditioning_image": "c.png", "text": "x"}])
    assert ControlDataset(tmp_path, 8)[0]["prompt"] == "x"


def _stripes(width, height):
    """Three vertical stripes, red | green | blue, of equal width."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    image[:, :third, 0] = image[:, third : 2 * third, 1] = image[:, 2 * third :, 2] = 255
    return image


def test_non_square_and_mismatched_images_are_cropped_to_the_same_picture(tmp_path):
    _save(tmp_path / "target" / "0.png", _stripes(192, 64))  # 3:1, the centre third is green
    _save(tmp_path / "source" / "0.png", _stripes(96, 32))  # same aspect, half the size
    _save(tmp_path / "target" / "1.png", np.full((40, 24, 3), 200))  # portrait, enlarged to 32
    _save(tmp_path / "source" / "1.png", np.full((64, 64, 3), 9))  # square: the aspects differ
    _lines(
        tmp_path / "prompt.json",
        [{"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": ""} for i in (0, 1)],
    )
    data = ControlDataset(tmp_path, 32)
    first = data[0]
    for key in ("hint", "image"):  # only the green centre third is left
        assert first[key].shape == (3, 32, 32)
        assert torch.all(first[key][1] == first[key].max()) and torch.all(first[key][[0, 2]] == first[key].min())
    with pytest.warns(DataWarning, match="do not align"):
        second = data[1]
    assert second["image"].shape == second["hint"].shape == (3, 32, 32)
    assert torch.allclose(second["image"], torch.full((3, 32, 32), 200 / 127.5 - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data[1]  # said once per dataset
    assert square_crop(np.zeros((10, 20, 3), np.uint8), 8).shape == (8, 8, 3)


def test_a_resolution_that_is_not_a_multiple_of_8_is_refused(tmp_path):
    write_dataset(tmp_path, "scenes", 1, size=64)
    with pytest.raises(DatasetError, match="multiple of 8"):
        ControlDataset(tmp_path, 100)


def _broken_folder(tmp_path, count, missing=(), corrupt=()):
    write_dataset(tmp_path, "scenes", count, size=32)
    for i in missing:
        (tmp_path / "target" / f"{i}.png").unlink()
    for i in corrupt:
        (tmp_path / "source" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path):
    data = ControlDataset(_broken_folder(tmp_path, 30, missing=[4], corrupt=[9]), 32, max_bad_fraction=0.1)
    with pytest.warns(DataWarning, match=r"skipping sample 4 .*cannot read"):
        item = data[4]
    assert item["index"] == 5 and item["prompt"] == data.prompts()[5]  # the next good sample
    with pytest.warns(DataWarning, match=r"skipping sample 9 .*corrupt"):
        indices = [data[i]["index"] for i in range(len(data))]
    assert indices == [i + 1 if i in (4, 9) else i for i in range(30)]
    assert data.bad_indices == [4, 9] and data.bad_count == 2 and data.checked_count == 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data[4]["index"] == 5  # a known bad sample is skipped without reading or warning again


def test_too_many_bad_samples_raise(tmp_path):
    data = ControlDataset(_broken_folder(tmp_path, 30, missing=[1, 2, 3]), 32, max_bad_fraction=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DatasetError, match=r"3 of the 20 samples .* max_bad_fraction=0.05"):
            for i in range(len(data)):
                data[i]
    everything_bad = ControlDataset(_broken_folder(tmp_path / "all", 3, missing=[0, 1, 2]), 32, max_bad_fraction=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DatasetError, match="none of the 3 samples can be read"):
            everything_bad[0]


def test_listing_errors_name_the_file_and_line(tmp_path):
    good = {"source": "s.png", "target": "t.png", "prompt": "p"}
    (tmp_path / "prompt.json").write_text(json.dumps(good) + "\n\n" + "{not json\n")
    with pytest.raises(DatasetError, match=r"prompt\.json, line 3: not valid JSON"):
        read_records(tmp_path)
    _lines(tmp_path / "prompt.json", [good, {"source": "s.png", "prompt": "p"}])
    with pytest.raises(DatasetError, match=r"line 2: missing 'target'"):
        read_records(tmp_path)
    _lines(tmp_path / "prompt.json", [{**good, "prompt": 3}])
    with pytest.raises(DatasetError, match=r"line 1: 'prompt' must be a string"):
        read_records(tmp_path)
    (tmp_path / "prompt.json").write_text("\n")
    with pytest.raises(DatasetError, match="lists no samples"):
        read_records(tmp_path)


def test_a_folder_without_a_dataset_is_refused_clearly(tmp_path):
    with pytest.raises(DatasetError, match=r"no training data found.*prompt\.json.*metadata\.jsonl"):
        detect_format(tmp_path)
    write_dataset(tmp_path / "fill50k", "fill50k", 1, size=32)
    with pytest.raises(DatasetError, match=r"did you mean .*fill50k\?"):
        ControlDataset(tmp_path, 32)
    with pytest.raises(DatasetError, match="no such folder"):
        detect_format(tmp_path / "nowhere")


# -- command line -------------------------------------------------------------------------------


def test_cli_data_writes_a_folder_and_refuses_to_overwrite_it(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "scenes", "--out", str(out), "--count", "3", "--size", "32", "--seed", "5"]) == 0
    assert f"wrote 3 scenes samples (32x32, seed 5) to {out}" in capsys.readouterr().out
    assert (
        len(ControlDataset(out, 32)) == 3
        and ControlDataset(out, 32).prompts()[2] == scene_sample(2, size=32, seed=5).prompt
    )
    before = (out / "prompt.json").read_bytes()
    assert main(["data", "fill50k", "--out", str(out), "--count", "2", "--size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"controlnet data: error: {out} already holds a dataset (prompt.json); choose another folder"
    assert (out / "prompt.json").read_bytes() == before
    (tmp_path / "file").write_text("")
    assert main(["data", "scenes", "--out", str(tmp_path / "file"), "--count", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("exists and is not a folder")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "2", "--size", "30"], "--size: size must be a multiple of 8"),
        (["--count", "0"], "--count must be between"),
        (["--count", "1", "--seed", "-1"], "--seed must be between"),
    ],
)
def test_cli_data_mistakes_get_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["data", "fill50k", "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("controlnet data: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()
