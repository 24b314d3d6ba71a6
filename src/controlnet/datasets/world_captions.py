"""Captions of world scenes, phrased the way people write them, within a fixed vocabulary.

A caption names every object (colour and kind) and the backdrop and floor colours; what varies is
the phrasing, drawn from the sample's own generator: one of `TEMPLATES` (objects first or setting
first; "on", "with", "in front of", "against"; commas), articles or none, how the list is joined
("a, b and c" / "a, b, and c" / "a, b, c"), synonyms for some kinds and for grey, and a capital
first letter or not. `phrasing_count(scene)` says how many distinct captions a scene can get.
"""

from __future__ import annotations

from itertools import product
from typing import Any

import numpy as np

# The words of each kind (the first is the canonical name, kept in the scene metadata).
NOUNS: dict[str, tuple[str, ...]] = {
    "sphere": ("sphere", "ball"),
    "cube": ("cube", "box", "block"),
    "cylinder": ("cylinder",),
    "cone": ("cone",),
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "ring": ("ring",),
    "star": ("star",),
    "person": ("person", "figure"),
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {"gray": ("gray", "grey")}
# {objects}: the listed objects; {floor} / {wall}: "a red floor" or "red floor" (with the article style).
TEMPLATES: tuple[str, ...] = (
    "{objects} on {floor} with {wall_background}",
    "{objects} on {floor} in front of {wall}",
    "{objects}, {floor_bare}, {wall_background_bare}",
    "{objects} in front of {wall_background}, on {ground}",
    "{wall_background_bare}, {floor_bare}, {objects}",
    "{wall} and {floor} with {objects}",
    "{objects} against {wall}, {floor_bare}",
    "{objects} standing on {floor}, {wall_background_bare}",
)
JOINERS: tuple[str, ...] = ("and", "oxford", "commas")
ARTICLES: tuple[bool, ...] = (True, False)


def caption(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """A caption of `scene` (its "objects" in order, "background", "floor"), phrasing drawn from `rng`."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    joiner = JOINERS[rng.integers(len(JOINERS))]
    articles = ARTICLES[rng.integers(len(ARTICLES))]
    capital = bool(rng.integers(2))
    words = [_noun_phrase(o, rng, articles) for o in scene["objects"]]
    wall = _color(scene["background"], rng)
    floor = _color(scene["floor"], rng)
    text = _fill(template, words, joiner, articles, wall, floor)
    return text[0].upper() + text[1:] if capital else text


def phrasing_count(scene: dict[str, Any]) -> int:
    """How many distinct captions `scene` can get (every combination of the choices, deduplicated)."""
    return len(all_captions(scene))


def _article(word: str) -> str:
    return "an " if word[0] in "aeiou" else "a "


def _color(name: str, rng: np.random.Generator) -> str:
    words = COLOR_WORDS.get(name, (name,))
    return words[rng.integers(len(words))]


def _noun_phrase(obj: dict[str, Any], rng: np.random.Generator, articles: bool) -> str:
    nouns = NOUNS[obj["kind"]]
    pick = int(rng.integers(len(nouns) + (1 if obj["kind"] == "person" else 0)))
    color = _color(obj["color"], rng)
    if pick == len(nouns):  # only for people
        return f"{'a ' if articles else ''}person in {color}"
    phrase = f"{color} {nouns[pick]}"
    return (_article(phrase) if articles else "") + phrase


def _join(items: list[str], joiner: str) -> str:
    if len(items) == 1:
        return items[0]
    if joiner == "commas":
        return ", ".join(items)
    comma = "," if joiner == "oxford" and len(items) > 2 else ""
    return ", ".join(items[:-1]) + f"{comma} and " + items[-1]


def _fill(template: str, words: list[str], joiner: str, articles: bool, wall: str, floor: str) -> str:
    def a(phrase: str) -> str:
        return (_article(phrase) if articles else "") + phrase

    return template.format(
        objects=_join(words, joiner),
        floor=a(f"{floor} floor"),
        floor_bare=f"{floor} floor",
        ground=f"{floor} ground",
        wall=a(f"{wall} wall"),
        wall_background=a(f"{wall} background"),
        wall_background_bare=f"{wall} background",
    )


def all_captions(scene: dict[str, Any]) -> set[str]:
    """Every caption `scene` can get (for tests and for counting; small scenes only)."""
    per_object = []
    for o in scene["objects"]:
        colours = COLOR_WORDS.get(o["color"], (o["color"],))
        per_object.append(
            [(n, c) for n in [*NOUNS[o["kind"]], *(["in"] if o["kind"] == "person" else [])] for c in colours]
        )
    out = set()
    walls = COLOR_WORDS.get(scene["background"], (scene["background"],))
    floors = COLOR_WORDS.get(scene["floor"], (scene["floor"],))
    for template, joiner, articles, capital, wall, floor, choice in product(
        TEMPLATES, JOINERS, ARTICLES, (False, True), walls, floors, product(*per_object)
    ):
        words = []
        for noun, colour in choice:
            if noun == "in":
                words.append(f"{'a ' if articles else ''}person in {colour}")
            else:
                words.append((_article(colour) if articles else "") + f"{colour} {noun}")
        text = _fill(template, words, joiner, articles, wall, floor)
        out.add(text[0].upper() + text[1:] if capital else text)
    return out
