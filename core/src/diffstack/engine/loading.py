"""Finding and loading models: safe name resolution, format checks and family detection.

Only safetensors are loaded (pickle can run code). The family comes from the configs or the weight
names, never from a file name.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffstack.engine.families import ADAPTERS, FamilyAdapter, Pipeline, WeightPrefixes, adapter_for
from diffstack.errors import FieldViolation, InvalidRequest, ModelError, shown
from diffstack.types import Family

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
DEFAULT_MODEL_NAME = "default"
EMBEDDED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
"""Models shipped inside the package besides the default (``synthetic-shapes-flux``), by folder name."""
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})


@dataclass(frozen=True)
class ModelCard:
    """What diffstack.json beside a model says about it (all optional)."""

    name: str = ""
    weights: str = ""
    description: str = ""
    default_width: int = 0
    default_height: int = 0
    default_steps: int = 0
    default_guidance: float | None = None

    @classmethod
    def read(cls, folder: Path) -> ModelCard:
        path = folder / "diffstack.json"
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


NAME_MAX = 255
"""The longest file name (in bytes) that POSIX file systems take: a longer model name cannot exist."""
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A model name is one entry of the models directory: letters, digits, ``.``, ``_``, ``-``, not starting
with a dot (so never ``.``, ``..`` or a hidden entry), without separators or control characters."""


def check_model_name(name: str, field: str = "model", what: str = "model") -> None:
    """Raise InvalidRequest (on ``field``) unless ``name`` is one safe entry name."""
    problem = _name_problem(name, what)
    if problem is not None:
        raise InvalidRequest(FieldViolation(field, f"{what} name {shown(name)} {problem}"))


def _name_problem(name: str, what: str = "model") -> str | None:
    """What makes ``name`` no safe entry name of a folder, or None."""
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        return f"is longer than {NAME_MAX} bytes"
    if not MODEL_NAME.fullmatch(name):
        return (
            f"must be one entry of the {what}s directory: letters, digits, '.', '_' and '-', "
            "not starting with '.', without '/' or control characters"
        )
    return None


def resolve_model_path(name: str, models_dir: Path | None) -> Path:
    """The resolved path of model ``name`` inside ``models_dir``; never a path outside it.

    ``name`` must pass :func:`check_model_name`; symlinks are resolved first, so every spelling of
    one model (a symlink to it, say) resolves to the same path: the key the engine loads it under.
    """
    if models_dir is None:
        check_model_name(name)
        raise InvalidRequest(
            FieldViolation("model", f"unknown model {shown(name)}: no models directory is configured")
        )
    return resolve_entry(name, models_dir)


def resolve_entry(
    name: str, folder: Path, field: str = "model", what: str = "model", suffix: str = ""
) -> Path:
    """The resolved path of entry ``name`` (plus ``suffix``) of ``folder``, never one outside it:
    the containment check of model names, for every named thing the server reads from disk."""
    check_model_name(name, field, what)
    root = folder.resolve()
    candidate = (root / f"{name}{suffix}").resolve()
    if not candidate.is_relative_to(root) or candidate == root:
        raise InvalidRequest(
            FieldViolation(field, f"{what} {shown(name)} must name an entry inside the {what}s directory")
        )
    if not candidate.exists():
        raise InvalidRequest(FieldViolation(field, f"unknown {what} {shown(name)}"))
    return candidate


def embedded_model_path(name: str) -> Path | None:
    """The folder of the model shipped inside the package as ``name``, or None.

    The embedded default answers to its own name too (``synthetic-shapes-64``, from its card). A name
    no file system can hold is no embedded model (looking it up would raise "File name too long").
    """
    if _name_problem(name) is not None:
        return None
    if name == _default_model_card_name():
        return DEFAULT_MODEL_DIR
    path = EMBEDDED_MODELS_DIR / name
    return path if (path / "model_index.json").is_file() else None


def embedded_model_names() -> list[str]:
    """The models shipped in :data:`EMBEDDED_MODELS_DIR` (the embedded default is not among them)."""
    if not EMBEDDED_MODELS_DIR.is_dir():
        return []
    return sorted(entry.name for entry in EMBEDDED_MODELS_DIR.iterdir() if embedded_model_path(entry.name))


@functools.cache
def _default_model_card_name() -> str:
    return ModelCard.read(DEFAULT_MODEL_DIR).name


def model_key(path: Path, models_dir: Path | None) -> str:
    """The name a resolved model path is known by: its path inside the models directory."""
    root = models_dir.resolve() if models_dir is not None else None
    if root is not None and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return path.name


def without_dirs(text: str, path: Path) -> str:
    """``text`` (a library's error message, say) without the server's folders above ``path``: clients
    learn which file of the model is wrong, never where models live on the server."""
    for folder in {path.parent, path.resolve().parent}:
        text = text.replace(f"{folder}{os.sep}", "")
    return text


def detect_family(path: Path) -> Family:
    """The family of a diffusers folder (from its configs) or a single file (from its weight names)."""
    return detect_adapter(path).family


def detect_adapter(path: Path) -> FamilyAdapter:
    """The adapter of the first family (in :data:`ADAPTERS` order) that recognises the model."""
    if path.is_dir():
        configs = {child.name: _read_config(child) for child in path.iterdir() if child.is_dir()}
        found = next((a for a in ADAPTERS if a.matches_configs(configs)), None)
        if found is None:
            raise ModelError(
                f"{path.name} has no unet/ or FLUX transformer/ config: not a supported diffusers model"
            )
        return found
    has = WeightPrefixes(_safetensors_keys(path))
    found = next((a for a in ADAPTERS if a.matches_weights(has)), None)
    if found is None:
        families = ", ".join(a.family.value for a in ADAPTERS)
        raise ModelError(f"the weights match no supported family ({families})")
    return found


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _safetensors_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            return set(weights.keys())
    except Exception as exc:
        reason = without_dirs(str(exc), path)
        raise ModelError(f"{path.name} is not a readable safetensors file: {reason}") from exc


def check_format(path: Path) -> None:
    """Refuse pickle formats and anything that is neither a diffusers folder nor a safetensors file."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path.name}: pickle checkpoints ({path.suffix}) can run code when loaded and are refused; "
            "convert the model to .safetensors"
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path.name} has no model_index.json: not a diffusers model folder")
        return
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path.name}: expected a diffusers folder or a .safetensors file")


def load_pipeline(path: Path, family: Family, device: str, dtype: torch.dtype) -> Pipeline:
    """Load ``path`` with diffusers, offline, safetensors only, onto ``device`` in ``dtype``."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    check_format(path)
    # Loading bars mean nothing in a server's log or under the CLI's own progress line.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    cls = adapter_for(family).pipeline_class()
    try:
        if path.is_dir():
            pipe = cls.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)
        else:
            pipe = cls.from_single_file(
                str(path), config=str(_single_file_config(path)), dtype=dtype, local_files_only=True
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load {path.name}: {without_dirs(str(exc), path)}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _single_file_config(path: Path) -> Path:
    """A single original-format checkpoint needs its diffusers configs, found beside it, offline."""
    folder = path.with_suffix("")
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"{path.name} is an original-format checkpoint; put its diffusers config folder "
            f"(model_index.json, component configs and tokenizers, no weights) at {folder.name}/ "
            "beside it: nothing is downloaded"
        )
    return folder
