"""Checkpoints in LeRobot's layout: the files a SmolVLA policy is saved as and loaded from.

    config.json                      the policy's configuration (flow.SmolVLAConfig.to_dict)
    model.safetensors                the parameters under the official names (KEY_PREFIXES)
    policy_preprocessor.json         LeRobot's processor pipelines: camera renames, tokenizer settings,
    policy_postprocessor.json        and the normaliser steps, each naming the state file of its stats
    policy_*_processor.safetensors   the normalisation stats, flat as '<feature>.<stat>' ("action.mean")
    vlm/                             a local VLM's config and tokenizer (no weights), so a moved
                                     checkpoint still loads

Loading also accepts what older and official checkpoints hold: normalisation buffers inside
model.safetensors (the older layout), a torch.compile `model._orig_mod.` key prefix, and a BF16/F32
mix of tensors.

This module is the file format alone: it reads and writes paths, JSON objects and tensors, and errors
name the file and the key at fault. flow.SmolVLA.from_pretrained and save_pretrained build the policy
from what it reads; it never imports flow.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import looks_like_hub_id, resolve_dir

CONFIG = "config.json"
WEIGHTS = "model.safetensors"

# ----------------------------------------------------------------------------------------------
# Official parameter names

# Our parameter names -> the official checkpoint's, by prefix.
KEY_PREFIXES = [
    ("vision.patch_embedding.", "model.vlm_with_expert.vlm.model.vision_model.embeddings.patch_embedding."),
    ("vision.position_embedding.", "model.vlm_with_expert.vlm.model.vision_model.embeddings.position_embedding."),
    ("vision.layers.", "model.vlm_with_expert.vlm.model.vision_model.encoder.layers."),
    ("vision.post_layernorm.", "model.vlm_with_expert.vlm.model.vision_model.post_layernorm."),
    ("connector.", "model.vlm_with_expert.vlm.model.connector.modality_projection."),
    ("lm.", "model.vlm_with_expert.vlm.model.text_model."),
    ("lm_head.", "model.vlm_with_expert.vlm.lm_head."),
    ("expert.", "model.vlm_with_expert.lm_expert."),
    ("", "model."),
]
# The part of the policy that is the VLM: a VLM's own files name these tensors without this prefix.
VLM_KEY_PREFIX = "model.vlm_with_expert.vlm."


def to_official(name: str) -> str:
    ours, official = next((o, f) for o, f in KEY_PREFIXES if name.startswith(o))
    return official + name[len(ours):]


def from_official(weights: dict[str, torch.Tensor], shapes: dict[str, torch.Size], source: str,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Official-key tensors -> a state dict under our names, for a model with these parameter
    `shapes` (our names). Checks names and shapes and lists every problem at once.

    dtype float32 casts everything to float32; another dtype casts the tensors to it except the
    float32 ones of a mixed checkpoint (projections, cross-attention k/v), which stay float32.
    """
    weights = {("model." + k[len("model._orig_mod."):] if k.startswith("model._orig_mod.") else k): v
               for k, v in weights.items()}
    expected = {to_official(n): shape for n, shape in shapes.items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [f"{k}: expected {tuple(expected[k])}, found {tuple(weights[k].shape)}"
                  for k in sorted(set(weights) & set(expected)) if expected[k] != weights[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit this SmolVLA configuration:"]
        lines += [f"  missing: {k} (expected shape {tuple(expected[k])})" for k in missing[:40]]
        lines += [f"  unexpected: {k} (shape {tuple(weights[k].shape)})" for k in unexpected[:40]]
        lines += [f"  shape mismatch: {m}" for m in mismatched[:40]]
        raise ValueError("\n".join(lines))
    state = {}
    for name in shapes:
        tensor = weights[to_official(name)]
        keep = dtype != torch.float32 and tensor.dtype == torch.float32
        state[name] = tensor.to(torch.float32 if keep else dtype)
    return state


# ----------------------------------------------------------------------------------------------
# Reading a policy directory


def find_policy(repo_id_or_dir: str | Path, revision: str | None = None) -> Path:
    """The local directory of a policy (a Hub id is downloaded). A directory above a train.py
    checkpoint (`<run>`, `<run>/checkpoints/last`) is an error that says where the policy is."""
    policy_dir = resolve_dir(repo_id_or_dir, "policy", revision=revision)
    if not (policy_dir / CONFIG).is_file():
        below = [policy_dir / sub for sub in ("pretrained_model", "checkpoints/last/pretrained_model")
                 if (policy_dir / sub / CONFIG).is_file()]
        hint = f": the policy is in {below[0]} (add '{below[0].relative_to(policy_dir)}')" if below else ""
        raise FileNotFoundError(f"no {CONFIG} in the policy directory {policy_dir}{hint}")
    return policy_dir


# Normalisation buffers as older checkpoints store them: normalize_inputs.buffer_observation_state.mean,
# or with a dataset name in front (normalize_inputs.so100-blue_buffer_observation_state.mean).
BUFFER_KEY = re.compile(r"^(?:normalize_inputs|normalize_targets|unnormalize_outputs)\.(?:.*_)?buffer_(\w+)\.(\w+)$")
# The features those buffers are recognised for, spelled there with "_" for ".".
BUFFER_FEATURES = {"observation_state": "observation.state", "action": "action"}
# The statistics a checkpoint keeps per feature.
STAT_NAMES = ("mean", "std", "min", "max", "count")


def read_weights(policy_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """model.safetensors -> (the parameters under official names, the older layout's normalisation
    buffers found beside them)."""
    path = policy_dir / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in the policy directory {policy_dir}")
    weights = read_safetensors(path)
    buffers = {k: weights.pop(k) for k in list(weights) if BUFFER_KEY.match(k)}
    return weights, buffers


# LeRobot's processor pipeline files: the JSONs list the steps, and the normaliser steps name the
# safetensors file holding the stats.
PREPROCESSOR_STATS = "policy_preprocessor_step_5_normalizer_processor.safetensors"
POSTPROCESSOR_STATS = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"


def read_processor_files(policy_dir: Path, buffers: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str], dict[str, str]]:
    """A checkpoint's normalisation stats {feature: {stat: tensor}}, the files they were looked for
    in (for the error a missing stat raises on use), and its camera renames {data key: policy key}.

    The stats are `buffers` (the older layout's, from read_weights) updated with the state files
    that the processor JSONs name.
    """
    flat, sources, renames = dict(buffers), [str(policy_dir / WEIGHTS)], {}
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        path = policy_dir / name
        sources.append(str(path))
        if not path.is_file():
            continue
        for step in read_json_object(path).get("steps", []):
            if step.get("state_file"):
                state_path = policy_dir / step["state_file"]
                if not state_path.is_file():
                    raise FileNotFoundError(f"{path} names the state file {state_path}, which is missing")
                flat.update(read_safetensors(state_path))
            if step.get("registry_name") == "rename_observations_processor":
                renames.update(step.get("config", {}).get("rename_map", {}))
    return parse_stats(flat), sources, renames


def parse_stats(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Flat '<feature>.<stat>' tensors (either layout) -> {feature: {stat: float32 tensor}}.

    Only the state and action features are recognised in the older underscore spelling; keys for
    other datasets' features (e.g. smolvla_base's 'so100.buffer.action.mean') are ignored.
    """
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        match = BUFFER_KEY.match(key)
        if match:
            feature, stat = BUFFER_FEATURES.get(match.group(1)), match.group(2)
        else:
            feature, _, stat = key.rpartition(".")
        if feature and stat in STAT_NAMES:
            stats.setdefault(feature, {})[stat] = value.detach().to(torch.float32).cpu()
    return stats


# ----------------------------------------------------------------------------------------------
# The VLM's files

# What a policy reads from its VLM's directory (without weights): copied beside local-VLM checkpoints.
VLM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VLM_SUBDIR = "vlm"


def vlm_location(policy_dir: Path, name: str) -> str | Path:
    """config.json's vlm_model_name: a directory inside the checkpoint (what save_vlm_files records
    for a local VLM), otherwise a Hub id or a path as given."""
    beside = policy_dir / name
    if not Path(name).is_absolute() and (beside / "config.json").is_file():
        return beside
    return name


def read_vlm_files(vlm: str | Path, weights: bool) -> tuple[Path, dict]:
    """(the VLM's local directory, its config.json) from a directory or Hub id; a Hub id downloads
    the JSON files (the tokenizer's too) and, when `weights`, the safetensors."""
    patterns = ["*.json"] + (["*.safetensors"] if weights else [])
    vlm_dir = resolve_dir(vlm, "VLM", allow_patterns=patterns)
    config_path = vlm_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in the VLM directory {vlm_dir}")
    vlm_config = read_json_object(config_path)
    if "text_config" not in vlm_config:
        raise ValueError(f"{config_path} has no text_config: is it a SmolVLM config?")
    return vlm_dir, vlm_config


def read_vlm_weights(vlm_dir: Path, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The tensors of a pretrained VLM's safetensors (Hugging Face names) that a policy with these
    parameter `shapes` (our names) takes from it, under our names; every one must be there."""
    ours = {to_official(n)[len(VLM_KEY_PREFIX):]: n for n in shapes if to_official(n).startswith(VLM_KEY_PREFIX)}
    found: dict[str, torch.Tensor] = {}
    for path in sorted(vlm_dir.glob("*.safetensors")):
        # Only what the policy keeps is read: text layers past num_vlm_layers are not expected.
        for key, tensor in read_safetensors(path, keep=lambda k: k in ours).items():
            if tuple(tensor.shape) != tuple(shapes[ours[key]]):
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(shapes[ours[key]])}")
            found[ours[key]] = tensor
    missing = sorted(VLM_KEY_PREFIX + key for key, name in ours.items() if name not in found)
    if missing:
        raise KeyError(f"the VLM weights in {vlm_dir} lack {len(missing)} tensors: {', '.join(missing[:10])}")
    return found


# ----------------------------------------------------------------------------------------------
# Saving


def save(out: Path, config: dict, state_dict: dict[str, torch.Tensor], *, stats: dict[str, dict[str, torch.Tensor]],
         eps: float, rename_map: dict[str, str], device: str, vlm_dir: Path | None) -> None:
    """Write a policy into `out`: config.json (vlm_model_name as save_vlm_files records it),
    model.safetensors under the official names, and the processor files with the stats
    (normalised with `eps`) and the camera renames. `device` is recorded in the processor files."""
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config["vlm_model_name"] = save_vlm_files(out, config["vlm_model_name"], vlm_dir)
    (out / CONFIG).write_text(json.dumps(config, indent=4))
    tensors = {to_official(n): t.detach().cpu().contiguous() for n, t in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    write_processor_files(out, config, stats, eps, rename_map, device)


def save_vlm_files(out: Path, name: str, vlm_dir: Path | None) -> str:
    """The vlm_model_name to record in a checkpoint written to `out`, for a policy whose VLM is
    `name`, read from `vlm_dir` (None: unknown).

    A Hub id is recorded as is. A VLM in a local directory (the demo's, or one passed as a path)
    has its config and tokenizer copied into `out`/vlm and is recorded as "vlm", relative to the
    checkpoint, so that a checkpoint moved or copied elsewhere still loads.
    """
    if looks_like_hub_id(name) and not Path(name).expanduser().is_dir():
        return name
    source = vlm_dir or Path(name).expanduser()
    if not (source / "config.json").is_file():
        return name  # nothing to copy: leave the name as it was given
    target = out / VLM_SUBDIR
    target.mkdir(exist_ok=True)
    for file_name in VLM_FILES:
        source_file, target_file = source / file_name, target / file_name
        if source_file.is_file() and not (target_file.exists() and target_file.samefile(source_file)):
            shutil.copyfile(source_file, target_file)
    return VLM_SUBDIR


def write_processor_files(out: Path, config: dict, stats: dict[str, dict[str, torch.Tensor]], eps: float,
                          rename_map: dict[str, str], device: str) -> None:
    """The processor JSONs and their stats files, as LeRobot writes them for a SmolVLA policy with
    this config.json."""
    flat = {f"{feature}.{stat}": value.detach().cpu().contiguous()
            for feature, found in stats.items() for stat, value in found.items()}
    save_file(flat, str(out / PREPROCESSOR_STATS))
    save_file(flat, str(out / POSTPROCESSOR_STATS))
    features = {**config["input_features"], **config["output_features"]}
    norm_config = {"eps": eps, "features": features, "norm_map": config["normalization_mapping"]}
    device_step = {"registry_name": "device_processor", "config": {"device": device, "float_dtype": None}}
    preprocessor = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": rename_map}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": config["tokenizer_max_length"], "task_key": "task", "padding_side": "right",
            "padding": "max_length" if config["pad_language_to"] == "max_length" else "longest",
            "truncation": True, "tokenizer_name": config["vlm_model_name"]}},
        device_step,
        {"registry_name": "normalizer_processor", "config": norm_config, "state_file": PREPROCESSOR_STATS},
    ]}
    postprocessor = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor",
         "config": {**norm_config, "features": config["output_features"]}, "state_file": POSTPROCESSOR_STATS},
        device_step,
    ]}
    (out / "policy_preprocessor.json").write_text(json.dumps(preprocessor, indent=2))
    (out / "policy_postprocessor.json").write_text(json.dumps(postprocessor, indent=2))


# ----------------------------------------------------------------------------------------------
# Reading files, with errors that name them


def read_safetensors(path: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose keys `keep` accepts."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as err:
        raise ValueError(f"cannot read {path} as safetensors: {err}") from err


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; errors name the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value
