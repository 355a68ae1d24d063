"""Model loading: safe name resolution, pickle refusal, family detection from configs and weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffstack.engine import Engine, GenerationRequest
from diffstack.engine.families import ADAPTERS, adapter_for
from diffstack.engine.loading import check_format, detect_family, resolve_model_path
from diffstack.errors import InvalidRequest, ModelError
from diffstack.types import Family


@pytest.mark.parametrize("family", list(Family))
def test_family_comes_from_the_configs(models_dir: Path, family: Family) -> None:
    assert detect_family(models_dir / f"tiny-{family.value}") is family


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", Family.FLUX),
        ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.bias", Family.SDXL),
        ("cond_stage_model.model.token_embedding.weight", Family.SD2),
        ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", Family.SD1),
    ],
)
def test_single_file_family_comes_from_weight_names(tmp_path: Path, key: str, family: Family) -> None:
    path = tmp_path / "misleading-name-sdxl.safetensors"
    save_file({key: torch.zeros(1)}, str(path))
    assert detect_family(path) is family


def test_unknown_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"some.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ModelError, match="no supported family"):
        detect_family(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_formats_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="pickle"):
        check_format(path)


def test_original_checkpoint_without_its_config_folder_says_what_to_do(
    models_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "models" / "single.safetensors"
    path.parent.mkdir()
    save_file({"cond_stage_model.transformer.x": torch.zeros(1)}, str(path))
    from diffstack.testing import baseline_settings

    engine = Engine(baseline_settings(path.parent), None)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="config folder"):
        engine.model("single.safetensors")


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../outside", "."])
def test_names_cannot_leave_the_models_directory(models_dir: Path, name: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        resolve_model_path(name, models_dir)
    assert error.value.violations[0].field == "model"


def test_symlinks_are_resolved_before_the_check(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "sneaky").symlink_to(outside)
    with pytest.raises(InvalidRequest):
        resolve_model_path("sneaky", root)


def test_unknown_model_is_an_invalid_request(models_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="unknown model"):
        resolve_model_path("nope", models_dir)


def test_models_are_listed_with_their_family(engine: Engine) -> None:
    listing = {m.name: m for m in engine.models()}
    assert listing["tiny-sd1"].default and listing["tiny-sd1"].loaded
    assert listing["tiny-sdxl"].family == "sdxl"


def test_is_loaded_tells_whether_using_a_model_would_load_it(models_dir: Path) -> None:
    from diffstack.plugins import load_plugins
    from diffstack.testing import baseline_settings

    settings = baseline_settings(models_dir, engine={"warmup_steps": 0})
    engine = Engine(settings, load_plugins(settings.plugins))
    assert not engine.is_loaded() and not engine.is_loaded("tiny-sd2")
    engine.model("tiny-sd2")
    assert engine.is_loaded("tiny-sd2") and not engine.is_loaded()


def test_every_family_has_one_adapter_holding_its_facts() -> None:
    assert {adapter.family for adapter in ADAPTERS} == set(Family)
    assert all(adapter_for(adapter.family) is adapter for adapter in ADAPTERS)
    flux, sd1 = adapter_for(Family.FLUX), adapter_for(Family.SD1)
    assert (flux.default_steps, flux.default_guidance, flux.size_multiple) == (28, 3.5, 16)
    assert (flux.dtype("cuda:0"), flux.dtype("cpu")) == (torch.bfloat16, torch.float32)
    assert (sd1.default_steps, sd1.default_guidance, sd1.size_multiple) == (20, 7.5, 8)
    assert sd1.dtype("cuda") is torch.float16
    assert adapter_for(Family.SDXL).pipeline_class().__name__ == "StableDiffusionXLPipeline"


def test_the_family_size_multiple_is_what_validation_asks(engine: Engine) -> None:
    with pytest.raises(InvalidRequest) as error:
        engine.prepare(GenerationRequest("a red circle", model="tiny-flux", width=72, height=64))
    assert [v.description for v in error.value.violations] == ["must be a positive multiple of 16, got 72"]


def test_embedded_models_answer_to_their_names_unless_the_models_dir_has_one(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffstack.engine import loading
    from diffstack.plugins import load_plugins
    from diffstack.testing import baseline_settings, save_tiny_model

    shipped = tmp_path / "models"
    save_tiny_model(Family.FLUX, shipped / "synthetic-flux")
    shutil.copytree(shipped / "synthetic-flux", shipped / "tiny-sd2")  # a name the models dir has too
    monkeypatch.setattr(loading, "EMBEDDED_MODELS_DIR", shipped)
    assert loading.embedded_model_names() == ["synthetic-flux", "tiny-sd2"]
    assert loading.embedded_model_path("m" * 256) is None  # too long for the folder: no OSError
    settings = baseline_settings(models_dir, engine={"default_model": ""})
    engine = Engine(settings, load_plugins(settings.plugins))
    assert engine.resolve("synthetic-flux") == "synthetic-flux"
    assert engine._path_of("synthetic-flux") == shipped / "synthetic-flux"
    assert engine.resolve("synthetic-shapes-64") == "default"  # the embedded default, by its card's name
    listing = {m.name: m for m in engine.models()}
    assert listing["synthetic-flux"].family == "flux" and not listing["synthetic-flux"].loaded
    assert engine._path_of(engine.resolve("tiny-sd2")) == (models_dir / "tiny-sd2").resolve()  # it wins
    assert listing["tiny-sd2"].family == "sd2"
