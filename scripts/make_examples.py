"""Write the example controls that ship with the world model (src/controlnet/examples/world/).

Condition maps of world scenes from a seed the model never trained on (training used seed 0, the
held-out evaluation seed 1), exact ground truth as `controlnet data world` makes it: one example per
shipped ControlNet (canny, depth, seg, pose, scribble), the canny T2I-Adapter on the canny example's
edges, and two compositions, several units at once (issue 19, point 5): pose + depth (the paper's
example) and canny + segmentation, each unit with its strength and window. Every example has its
scene's caption and a second prompt naming other colours for the same things. `make demo`, the
tests and the docs use them. Run from the repo root:

    .venv/bin/python scripts/make_examples.py
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from controlnet.datasets.synthetic import SCENE_COLORS
from controlnet.datasets.world import DEFAULT_SIZE, SOLIDS, WorldSample, world_sample
from controlnet.datasets.world_captions import caption

OUT = Path(__file__).resolve().parents[1] / "src" / "controlnet" / "examples" / "world"
SEED, SIZE = 2, DEFAULT_SIZE


def kinds(sample: WorldSample) -> list[str]:
    return [item["kind"] for item in sample.scene["objects"]]


# What each example's scene must show, so that its condition has something to say.
WANTED: dict[str, Callable[[WorldSample], bool]] = {
    "canny": lambda s: len(kinds(s)) >= 3 and "person" not in kinds(s),
    "depth": lambda s: sum(k in SOLIDS for k in kinds(s)) >= 3,
    "seg": lambda s: sum(k in SOLIDS for k in kinds(s)) >= 1 and len(set(kinds(s))) >= 3 and "person" not in kinds(s),
    "pose": lambda s: kinds(s).count("person") == 1 and len(kinds(s)) >= 2,
    "scribble": lambda s: 2 <= len(kinds(s)) <= 3 and "person" not in kinds(s),
}
# The compositions: (name, the scene of which example, its units as (model, strength, start, end)).
# Pose steers the figure through the whole run, depth only the first 60% of the steps at 0.8 (the
# figure's depth is coarse, the skeleton precise); canny and seg share the work at 0.7 each.
COMPOSITIONS = (
    ("pose-depth", "pose", (("pose", 1.0, 0.0, 1.0), ("depth", 0.8, 0.0, 0.6))),
    ("canny-seg", "seg", (("canny", 0.7, 0.0, 1.0), ("seg", 0.7, 0.0, 1.0))),
)


def other_colours(scene: dict) -> dict:
    """The scene with every colour moved five places along SCENE_COLORS (still all different)."""
    names = list(SCENE_COLORS)

    def shift(name: str) -> str:
        return names[(names.index(name) + 5) % len(names)]

    objects = [{**item, "color": shift(item["color"])} for item in scene["objects"]]
    return {**scene, "background": shift(scene["background"]), "floor": shift(scene["floor"]), "objects": objects}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    scenes: dict[str, tuple[int, WorldSample]] = {}
    index = 0
    while len(scenes) < len(WANTED):  # the first held-apart scene that fits each condition, all different
        sample = world_sample(index, size=SIZE, seed=SEED)
        condition = next((c for c, fits in WANTED.items() if c not in scenes and fits(sample)), None)
        if condition is not None:
            scenes[condition] = (index, sample)
        index += 1

    for old in OUT.glob("*.png"):
        old.unlink()

    def map_file(scene_of: str, condition: str) -> str:
        name = f"{scene_of}-{condition}.png"
        Image.fromarray(scenes[scene_of][1].conditions[condition]).save(OUT / name)
        return name

    listing = []
    for condition in WANTED:  # in the registry's order: the first example is canny (tests run Canny on its scene)
        index, sample = scenes[condition]
        Image.fromarray(sample.image).save(OUT / f"{condition}-scene.png")
        rng = np.random.default_rng([SEED, index])  # the other prompt's phrasing, fixed
        entry = {
            "name": condition,
            "prompt": sample.prompt,
            "other_prompt": caption(other_colours(sample.scene), rng),
            "scene": f"{condition}-scene.png",
            "source": {"task": "world", "seed": SEED, "index": index, "size": SIZE},
        }
        listing.append({**entry, "controls": [{"model": condition, "image": map_file(condition, condition)}]})
        if condition == "canny":  # the T2I-Adapter beside the ControlNet, on the same edges
            adapter = {"model": "canny", "kind": "adapter", "image": "canny-canny.png"}
            listing.append({**entry, "name": "canny-adapter", "controls": [adapter]})
    for name, scene_of, units in COMPOSITIONS:
        entry = next(item for item in listing if item["name"] == scene_of)
        controls = [
            {"model": model, "image": map_file(scene_of, model), "strength": strength, "start": start, "end": end}
            for model, strength, start, end in units
        ]
        listing.append({**entry, "name": name, "controls": controls})
    (OUT / "examples.json").write_text(json.dumps(listing, indent=2) + "\n")
    for item in listing:
        units = " + ".join(f"{c['model']}{'(adapter)' if 'kind' in c else ''}" for c in item["controls"])
        print(f"{item['name']} [{units}]: {item['prompt']}  |  {item['other_prompt']}")


if __name__ == "__main__":
    main()
