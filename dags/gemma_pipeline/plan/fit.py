"""Does the model fit the profile? Before any Job runs, `plan` refuses a fine-tune whose base model cannot fit one
device of its accelerator profile for LoRA, naming both, and says which profiles would hold it.

An estimate, not a measurement: it has run only on tiny models (docs/models.md). Per device:

- weights: the preset's parameter count (keras-hub's metadata; a multimodal preset's vision and audio encoders are
  counted though the fine-tune leaves them out) × bytes per weight (bfloat16 2, float32 4 under mixed precision,
  int8 1, int4 ½), split over the model-parallel devices;
- activations kept for the backward pass: 34 bytes × hidden size × layers per token (16-bit activations with fused
  attention, no recomputation: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
  2022), for the tokens of one data-parallel replica's share of the batch, split over the model axis. The hidden
  size is solved from parameters = 12 · layers · hidden² + vocabulary · hidden (overstates it for Gemma 4's
  per-layer inputs and experts: the estimate errs on the safe side);
- the LM head's logits (at most `HEAD_LOGITS_BUDGET`: the loss-position head's cap) and 20% for XLA's scratch.

LoRA's own weights and optimizer state are a fraction of a percent of these and are inside the 20%.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_pipeline.plan import profiles
from gemma_pipeline.plan.profiles import Profile
from jobs import families
from jobs.contract.errors import BadInputError

INDEX = Path(__file__).resolve().with_name("model_presets.json")
GIB = 2**30
ACTIVATION_BYTES = 34  # per token, layer and hidden unit (Korthikanti et al. 2022, 16-bit, fused attention)
OVERHEAD = 1.2
HEAD_LOGITS_BYTES = 512 * 2**20  # jobs.common.lm.HEAD_LOGITS_BUDGET: the loss-position head's logits at most
VOCABULARY = 262_144
WEIGHT_BYTES = {"none": 2.0, "int8": 1.0, "int4": 0.5}
# One device's memory (GiB) by accelerator label; a CPU profile's is its memory limit.
DEVICE_GIB = {"tpu-v5-lite-podslice": 16, "tpu-v6e-slice": 32, "nvidia-l4": 22, "nvidia-tesla-a100": 40,
              "nvidia-h100-80gb": 80}


@dataclass(frozen=True)
class Estimate:
    weights: float  # GiB per device
    activations: float
    total: float
    capacity: float
    weight_dtype: str

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def presets() -> dict[str, dict[str, Any]]:
    return json.loads(INDEX.read_text())


def device_gib(profile: Profile) -> float:
    for label in (profiles.TPU_ACCELERATOR, profiles.GPU_ACCELERATOR):
        if label in profile.node_selector:
            return float(DEVICE_GIB[profile.node_selector[label]])
    return _quantity_gib(profile.limits.get("memory") or profile.requests["memory"])


def _quantity_gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return float(number) * {"Gi": 1, "Ti": 1024, "Mi": 1 / 1024, "G": 1e9 / GIB, "": 1 / GIB}[unit]


def hidden_size(params: int, layers: int) -> float:
    """h from params = 12·L·h² + V·h (the positive root)."""
    a, b = 12 * layers, VOCABULARY
    return (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)


def estimate(preset: dict[str, Any], profile: Profile, values: dict[str, Any]) -> Estimate:
    """One device's memory for the fine-tune of `preset` ({params, layers}) with these Param `values`."""
    quantization = values.get("base_quantization", "none")
    weight_bytes = 4.0 if quantization == "none" and values.get("mixed_precision") else WEIGHT_BYTES[quantization]
    model_parallel = int(values.get("model_parallel", 1))
    devices = profile.devices_per_host * profile.hosts if profile.accelerator_resource else profile.hosts
    replicas = max(1, devices // model_parallel)
    tokens = math.ceil(int(values["batch_size"]) / replicas) * int(values["sequence_length"])
    weights = preset["params"] * weight_bytes / model_parallel / GIB
    hidden = hidden_size(preset["params"], preset["layers"])
    activations = (tokens * preset["layers"] * hidden * ACTIVATION_BYTES / model_parallel + HEAD_LOGITS_BYTES) / GIB
    dtype = {4.0: "float32", 2.0: "bfloat16", 1.0: "int8", 0.5: "int4"}[weight_bytes]
    return Estimate(round(weights, 2), round(activations, 2), round((weights + activations) * OVERHEAD, 2),
                    device_gib(profile), dtype)


def check(values: dict[str, Any], profile_name: str) -> Estimate | None:
    """Refuse (ValueError) a fine-tune whose base model is a known preset that the profile cannot hold, naming the
    model, the profile, the estimate and the profiles that would; None when the model is not a known preset (a
    directory or hf:// checkpoint: its size is not known before it is read)."""
    uri = values["base_model"]
    try:
        families.of_name(uri, "base_model")
    except BadInputError as err:
        raise ValueError(str(err)) from None
    preset = presets().get(uri.rstrip("/").rsplit("/", 2)[-2] if uri.startswith("kaggle://") else uri)
    if preset is None:
        return None
    profile = profiles.get(profile_name)
    found = estimate(preset, profile, values)
    if found.fits:
        return found
    fitting = [p.name for p in profiles.PROFILES.values() if p.name != profile.name and _fits_somehow(preset, p, values)]
    raise ValueError(
        f"finetune_profile: {profile.name!r} cannot hold {uri} ({preset['params'] / 1e9:.1f}B parameters) for LoRA at "
        f"sequence_length {values['sequence_length']}, batch_size {values['batch_size']}, model_parallel "
        f"{values.get('model_parallel', 1)}: an estimated {found.total:.1f} GiB per device (weights {found.weights:.1f} "
        f"GiB in {found.weight_dtype}, activations {found.activations:.1f} GiB) against its {found.capacity:.0f} GiB. "
        f"Profiles that would: {', '.join(fitting) or 'none at these settings'} (with model_parallel up to a host's "
        "devices), or set base_quantization int8, or shorten sequence_length")


def _fits_somehow(preset: dict[str, Any], profile: Profile, values: dict[str, Any]) -> bool:
    """Fits with some model_parallel that divides one host's devices."""
    per_host = profile.devices_per_host if profile.accelerator_resource else 1
    return any(estimate(preset, profile, {**values, "model_parallel": m}).fits
               for m in range(1, per_host + 1) if per_host % m == 0 and int(values["batch_size"]) % max(1, per_host * profile.hosts // m) == 0)


# ---- the generated preset index and the docs' table


def render_index() -> dict[str, str]:
    """model_presets.json from keras-hub's preset metadata (the dev environment has keras-hub): every text causal-LM
    preset of a supported family, its parameter count and layers (read from the description; a preset whose
    description has none takes the layers of the family's preset nearest in size)."""
    import importlib

    index: dict[str, dict[str, Any]] = {}
    for family in families.all_families():
        found = {}
        for module in family.preset_modules:
            for name, preset in importlib.import_module(module).backbone_presets.items():
                if "embedding" in name or name.endswith("_assistant"):
                    continue  # not a causal LM this pipeline fine-tunes
                metadata = preset["metadata"]
                layers = re.search(r"(\d+)-layer", metadata["description"])
                found[name] = {"family": family.name, "params": int(metadata["params"]),
                               "layers": int(layers.group(1)) if layers else None}
        known = [p for p in found.values() if p["layers"]]
        for preset in found.values():
            if preset["layers"] is None:
                preset["layers"] = min(known, key=lambda p: abs(p["params"] - preset["params"]))["layers"]
        index.update(found)
    return {"": json.dumps(dict(sorted(index.items())), indent=1) + "\n"}


START, END = "<!-- fit table: generated by gemma_pipeline.tools.generate -->", "<!-- end of fit table -->"
TABLE_PRESETS = ("gemma3_1b", "gemma3_12b_text", "gemma4_2b", "gemma4_4b", "gemma4_26b_a4b", "gemma4_31b")
TABLE_PROFILES = ("gpu-l4-1", "tpu-v5e-1", "tpu-v6e-1", "gpu-h100-1", "tpu-v5e-8", "tpu-v6e-8", "gpu-h100-8")
TABLE_SETTINGS = ({"sequence_length": 1024, "batch_size": 4}, {"sequence_length": 8192, "batch_size": 1})


def table() -> str:
    """Which preset fits which profile: the smallest model_parallel that fits, or `—`, at each setting."""
    known = presets()
    lines = ["| Preset | Parameters | " + " | ".join(TABLE_PROFILES) + " |", "|---|---|" + "---|" * len(TABLE_PROFILES)]
    for settings in TABLE_SETTINGS:
        lines.append(f"| *sequence {settings['sequence_length']}, batch {settings['batch_size']}, bfloat16* | | "
                     + " | ".join("" for _ in TABLE_PROFILES) + " |")
        for name in TABLE_PRESETS:
            preset = known[name]
            cells = []
            for profile_name in TABLE_PROFILES:
                profile = profiles.get(profile_name)
                fitting = [m for m in range(1, profile.devices_per_host + 1) if profile.devices_per_host % m == 0
                           and estimate(preset, profile, {**settings, "model_parallel": m}).fits]
                cells.append("—" if not fitting else ("fits" if fitting[0] == 1 else f"model_parallel {fitting[0]}"))
            lines.append(f"| {name} | {preset['params'] / 1e9:.1f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_doc(doc: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise ValueError(f"no {START} ... {END} markers to fill")
    return pattern.sub(lambda _: f"{START}\n{table()}\n{END}", doc)
