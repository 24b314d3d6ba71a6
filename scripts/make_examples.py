"""Write the example control images that ship with the package (src/controlnet/examples/).

Canny edges (and the scene pictures they come from) of synthetic scenes from a seed the shipped
model never trained on (training used seed 0, the held-out evaluation seed 1), with their captions,
and for each a second prompt naming other colours for the same shapes. `make demo` and the docs
use them. Run from the repo root:

    .venv/bin/python scripts/make_examples.py
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from controlnet.datasets.synthetic import SCENE_COLORS, SCENE_SHAPES, scene_caption, scene_sample

OUT = Path(__file__).resolve().parents[1] / "src" / "controlnet" / "examples"
SEED, SIZE, COUNT = 2, 128, 4


def other_colours(scene: dict) -> dict:
    """The scene with every colour moved five places along SCENE_COLORS (still all different)."""
    names = list(SCENE_COLORS)

    def shift(name: str) -> str:
        return names[(names.index(name) + 5) % len(names)]

    objects = [{**item, "color": shift(item["color"])} for item in scene["objects"]]
    return {"background": shift(scene["background"]), "objects": objects}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    listing, shapes_seen, index = [], set(), 0
    while len(listing) < COUNT:  # scenes of 2 or 3 shapes, together showing every kind of shape
        sample = scene_sample(index, size=SIZE, seed=SEED)
        index += 1
        shapes = {item["shape"] for item in sample.scene["objects"]}
        if len(sample.scene["objects"]) < 2 or (shapes <= shapes_seen and len(shapes_seen) < len(SCENE_SHAPES)):
            continue
        shapes_seen |= shapes
        name = f"scene-{len(listing) + 1}"
        Image.fromarray(sample.source).save(OUT / f"{name}.png")
        Image.fromarray(sample.target).save(OUT / f"{name}-scene.png")  # a picture to run Canny on
        listing.append(
            {
                "name": name,
                "control": f"{name}.png",
                "scene": f"{name}-scene.png",
                "prompt": sample.prompt,
                "other_prompt": scene_caption(other_colours(sample.scene)),
                "source": {"task": "scenes", "seed": SEED, "index": index - 1, "size": SIZE},
            }
        )
    (OUT / "examples.json").write_text(json.dumps(listing, indent=2) + "\n")
    for item in listing:
        print(f"{item['name']}: {item['prompt']}  |  {item['other_prompt']}")


if __name__ == "__main__":
    main()
