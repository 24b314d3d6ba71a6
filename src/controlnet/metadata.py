"""What a generated image carries: the settings record (JSON, reproducible) and the
AUTOMATIC1111-style "parameters" text, for the command line, the web UI and the HTTP API alike."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__


def model_records(base: Path, controlnets: Sequence[Path], adapters: Sequence[Path] = ()) -> dict:
    """Name and full SHA-256 of each model file or diffusers folder (cached: see hashing.py); the
    T2I-Adapters' under "adapters", when there are any (a record without is as before adapters)."""
    from .hashing import model_sha256

    def record(path: Path) -> dict[str, str]:
        try:
            return {"name": path.name, "sha256": model_sha256(path)}
        except (OSError, ValueError) as error:  # it loaded a moment ago; a hash is not worth failing for
            reason = " ".join(str(error).split()) or type(error).__name__
            print(f"warning: cannot hash {path}: {reason}", file=sys.stderr)
            return {"name": path.name}

    records = {"base": record(base), "controlnets": [record(path) for path in controlnets]}
    if adapters:
        records["adapters"] = [record(path) for path in adapters]
    return records


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=_json_fallback)


def _json_fallback(value: Any) -> Any:
    # A numpy number or anything else the pipeline may add later must not make saving fail after
    # the images were made: numbers become numbers, anything else its text.
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def quote(value: object) -> str:
    """AUTOMATIC1111's `quote`: JSON-quote a value holding a comma, colon or newline, so the
    'Key: value, ...' line still splits correctly."""
    text = format_number(value) if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _model_label(record: dict) -> tuple[str, str | None]:
    """(name as AUTOMATIC1111 shows it: the file name without extension, short hash or None)."""
    from .hashing import short_hash

    name = record["name"]
    sha256 = record.get("sha256")
    return (Path(name).stem if sha256 else name), (short_hash(sha256) if sha256 else None)


def parameters_text(record: dict, models: dict) -> str:
    """The AUTOMATIC1111-style 'parameters' text: the prompt, 'Negative prompt: ...', then one
    'Key: value, ...' line. The first line is the prompt as the model saw it (with the added prompt)."""
    prompt = f"{record['prompt']}, {record['added_prompt']}" if record["added_prompt"] else record["prompt"]
    lines = [prompt]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    base_name, base_hash = _model_label(models["base"])
    fields: dict[str, object] = {
        "Steps": record["steps"],
        "Sampler": record["sampler"],
        "CFG scale": record["guidance_scale"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
    }
    if base_hash:
        fields["Model hash"] = base_hash
    fields["Model"] = base_name
    fields["Eta"] = record["eta"]
    if record.get("loras"):  # as the web UI writes them (its extra networks)
        fields["Lora hashes"] = ", ".join(f"{lora['name']}: {lora['hash']}" for lora in record["loras"])
    if "denoising_strength" in record:
        fields["Denoising strength"] = record["denoising_strength"]
    for i, control in enumerate(record["controls"]):
        # An adapter unit names its adapter file where a ControlNet unit names its ControlNet, as the
        # AUTOMATIC1111 extension writes both kinds of unit ("ControlNet i", "Model: name [hash]").
        if control.get("adapter") is not None:
            net_name, net_hash = _model_label(models["adapters"][control["adapter"]])
        else:
            net_name, net_hash = _model_label(models["controlnets"][control["controlnet"]])
        unit = {
            "Module": control["annotator"],
            "Model": f"{net_name} [{net_hash}]" if net_hash else net_name,
            "Weight": control["strength"],
            "Resize Mode": control["resize_mode"],
            "Guidance Start": control["start"],
            "Guidance End": control["end"],
            "Control Mode": control["mode"],
            **control["annotator_params"],
        }
        fields[f"ControlNet {i}"] = ", ".join(f"{k}: {quote(v)}" for k, v in unit.items())
    fields["Version"] = f"controlnet {__version__}"
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def map_text(record: dict, seeds: Sequence[int], index: int) -> dict[str, str]:
    """The PNG text of detected map ``index``: the batch's record naming all its seeds (a map belongs
    to the whole batch) rather than one."""
    map_record = {k: v for k, v in record.items() if k != "seed"} | {"seeds": list(seeds), "control_map": index}
    return {"controlnet": to_json(map_record)}


def image_text(record: dict, models: dict, seed: int, index: int) -> dict[str, str]:
    """The PNG text of image ``index`` of a batch: every image carries its own seed."""
    image_record = {**record, "seed": seed, "batch_index": index}
    return {"parameters": parameters_text(image_record, models), "controlnet": to_json(image_record)}
