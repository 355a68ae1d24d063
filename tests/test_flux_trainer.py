"""The synthetic-shapes-flux trainer on CPU: the shapes and indices a GPU run depends on, one real
denoiser step, and the guards that keep a bad batch out of the weights.

On CUDA an id past an embedding table or a mismatched position-id shape shows up as an illegal memory
access in some later kernel; here the same step runs on the host, where each would raise at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import phase_trainer  # noqa: E402
import train_flux_model  # noqa: E402


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> train_flux_model.Trainer:
    """The real Trainer (shipped config), its denoiser phase set up on 24 scenes of the world."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    args = train_flux_model.parse_args(
        ["--device", "cpu", "--ckpt", str(ckpt), "--transformer-batch", "4", "--transformer-micro-batch", "2"]
    )
    every_scene = phase_trainer.all_scenes
    with pytest.MonkeyPatch.context() as patch:  # 24 scenes: no need to render the whole world
        patch.setattr(phase_trainer, "all_scenes", lambda: every_scene()[:24])
        t = train_flux_model.Trainer(args)
    t.state["phase"] = "denoiser"
    t._make_optimizer()
    t.setup_denoiser_phase()
    return t


@pytest.mark.slow
def test_every_token_id_fits_both_text_encoders(trainer: train_flux_model.Trainer) -> None:
    for name, (table, empty) in (("text_encoder", trainer.clip_ids), ("text_encoder_2", trainer.t5_ids)):
        vocab = trainer.parts[name].get_input_embeddings().num_embeddings
        assert int(table.min()) >= 0 and int(table.max()) < vocab and int(empty.max()) < vocab, name
    assert trainer.clip_ids[0].shape[-1] <= trainer.parts["text_encoder"].config.max_position_embeddings


@pytest.mark.slow
def test_position_ids_match_the_joint_sequence(trainer: train_flux_model.Trainer) -> None:
    cfg = trainer.parts["transformer"].config
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert trainer.txt_ids.shape == (trainer.t5_ids[0].shape[-1], 3)  # 2-D: diffusers' current layout
    assert trainer.img_ids.shape == (16, 3) and int(trainer.img_ids.max()) == 3  # 4x4 packed latents
    assert cfg.in_channels == 4 * trainer.vae.config.latent_channels


@pytest.mark.slow
def test_check_inputs_refuses_an_id_past_the_vocabulary(trainer: train_flux_model.Trainer) -> None:
    table, empty = trainer.t5_ids
    bad = table.clone()
    bad[0, 0, 0] = trainer.parts["text_encoder_2"].get_input_embeddings().num_embeddings
    tables = {"text_encoder": trainer.clip_ids, "text_encoder_2": (bad, empty)}
    with pytest.raises(SystemExit, match="vocabulary"):
        train_flux_model.check_inputs(trainer.parts, tables, trainer.txt_ids, trainer.img_ids, 16)
    tables["text_encoder_2"] = trainer.t5_ids
    with pytest.raises(SystemExit, match="position ids"):
        train_flux_model.check_inputs(trainer.parts, tables, trainer.txt_ids[:-1], trainer.img_ids, 16)


@pytest.mark.slow
def test_a_denoiser_step_in_micro_batches_is_finite_and_moves_the_weights(
    trainer: train_flux_model.Trainer,
) -> None:
    before = trainer.parts["transformer"].proj_out.weight.detach().clone()
    loss = trainer.denoiser_step(0)
    assert torch.isfinite(torch.tensor(loss)) and 0.5 < loss < 10  # velocity target has variance ~2
    assert trainer.batch_shapes == {"latents": (2, 16, 8, 8), "token_ids": [(2, 77), (2, 32)]}
    assert not torch.equal(before, trainer.parts["transformer"].proj_out.weight)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_then_stops_the_run(
    trainer: train_flux_model.Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer.denoiser_loss
    monkeypatch.setattr(trainer, "denoiser_loss", lambda: real() * float("nan"))
    weights = trainer.parts["transformer"].proj_out.weight.detach().clone()
    ema = trainer.ema["transformer"].proj_out.weight.detach().clone()
    trainer.skipped_steps = 0
    for _ in range(phase_trainer.MAX_SKIPPED):
        trainer.denoiser_step(1)
    assert torch.equal(weights, trainer.parts["transformer"].proj_out.weight)
    assert torch.equal(ema, trainer.ema["transformer"].proj_out.weight)
    with pytest.raises(phase_trainer.TrainingDiverged) as stop:
        trainer.denoiser_step(1)
    assert stop.value.code == 5


def test_warm_up_fits_a_short_planned_run() -> None:
    # call2 planned 141 steps under a 200-step warm-up: the lr never reached its peak
    assert phase_trainer.lr_at(28, 141, 5e-4, 200) == pytest.approx(5e-4)
    assert phase_trainer.lr_at(0, 10**9, 5e-4, 200) == pytest.approx(5e-4 / 200)
