"""Train synthetic-shapes-flux from scratch with rectified flow: seeded, resumable, bounded.

    python train/train_flux_model.py --device cuda --budget-minutes 7 --vae-fraction 0.16 \
        --max-run-minutes 8.2 --export-on-stop --eval --out /tmp/flux/synthetic-shapes-flux \
        --ckpt /tmp/flux/ckpt --pack-to $OUT

(about 9 minutes on an H200: ~30 s of imports, ~15 s of set-up, the VAE at 42.6 ms/step, the denoiser
at 207.4 ms/step, then export and evaluation). The shipped model came from the same command with
--budget-minutes 7.5 under `timeout 520` on 2026-12-01: the wall limit stopped it at step 1,784 of
the 1,822 planned and the timeout cut its evaluation (its model card says how it was scored after, by
score_flux_model.py). --vae-steps / --transformer-steps pass a plan explicitly instead.
CPU run (OMP_NUM_THREADS=1 on a shared machine: two threads against other processes ran 8x slower):
--device cpu --budget-minutes 11 --vae-fraction 0.3 --transformer-batch 64 --transformer-micro-batch 16
--warmup 20 --log-every 10 --export-on-stop --eval --eval-scenes 24 --eval-seeds 0 --eval-steps 20,8
--out /tmp/f/m/synthetic-shapes-flux --ckpt /tmp/f/c --pack-to /tmp/f/p
(batch 64 in 4 micro-batches, as the GPU's 2048 go in 4 of 512).
Before the first step every token id and position id a batch can hold is checked against what the models
index (check_inputs). A denoiser step that fails (a CUDA error) logs its shapes and exits 4; the checkpoint
written before the denoiser phase lets a re-run with a smaller --transformer-micro-batch resume without
retraining the VAE. A step whose loss or gradient is not finite is skipped; more than
phase_trainer.MAX_SKIPPED of them stop the run with exit 5, after exporting the (finite) EMA weights.

The run is phase_trainer's (the VAE, then the text encoders + denoiser, checkpointed, step counts
planned from the measured speed); the architecture is flux_model_spec's. Phase 2 trains CLIP, T5 and
the FluxTransformer2DModel jointly on the rectified-flow objective FLUX was trained with:
x_t = (1 - t) x_0 + t noise, the transformer predicts the velocity noise - x_0, with t drawn
logit-normal (SD3's choice) and then shifted exactly as the scheduler shifts 16-token images at
inference. --eval scores the exported model at 20, 12 and 8 flow-Euler steps, and a randomly
initialised model of the same config for contrast, and writes the model card. --pack-to DIR writes the
folder as flux-model.tar.part-aa.. (each under 15 MiB) plus the run's stats JSON, for the trip back
from a GPU machine: `cat flux-model.tar.part-* | tar x`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core" / "src"))  # diffstack.synthetic without installing the core
sys.path.insert(0, str(Path(__file__).resolve().parent))

import default_model_spec  # noqa: E402
import flux_model_card  # noqa: E402
import flux_model_spec as spec  # noqa: E402
import phase_trainer  # noqa: E402
from phase_trainer import log  # noqa: E402

NAME = "synthetic-shapes-flux"
PART_BYTES = 14 * 2**20
MAX_PARTS = 3
LATENT_SIDE = 8  # 64 px / the VAE's factor 8
CUDA_MICRO_BATCH = 512
"""Examples per forward/backward on CUDA (the batch of 2048 accumulates over 4).

What the H200 runs showed, and what the CPU can check. The shapes and indices are right (check_inputs
and tests/test_flux_trainer.py: the largest token id is 49407 of 49,408 in both encoders, 77 and 32
tokens, txt_ids (32, 3) and img_ids (16, 3), RoPE axes 16 + 24 + 24 = head dim 64, 2x2 patches of 16
latent channels = 64 input channels), so the illegal memory access was no out-of-range embedding
index. Both failures came from fused bf16 kernels: the first run (2048 in one pass) fed T5's trained
relative-position bias to SDPA as a float mask needing a gradient, broadcast over the batch
(memory-efficient attention's bias-gradient backward, a path with known illegal-memory-access bugs); the
second (256 per pass, T5 already eager) still ran CLIP's causal attention and FLUX's joint attention
through the fused bf16 backward, and its micro-batch-64 retry went NaN by step 100 with the recipe
itself sound: no division by t or 1 - t, t inside (0, 1), clipped gradients; on CPU the recipe in
float32 falls from 2.39 to 0.65 in 362 steps at the same peak learning rate, and call2's own path (bf16
autocast, default SDPA, T5 on SDPA, its 200-step warm-up) replayed for 120 steps stays finite (2.36 to
1.83), so the NaN came from the GPU's kernels, not the numbers. So phase 2 takes the well-trodden
paths: float32 with TF32 matmuls (no bf16 autocast) and attention through SDPA's math backend (plain
GEMMs and a softmax; at 48 joint tokens it costs little). The VAE phase, which ran cleanly, keeps bf16.

Why 512 and not 64: a micro-batch is ~3,350 eager ops forward and backward whatever its size (3,550
under bf16 autocast, 530 of them casts), so the step is bound by host dispatch, not the GPU: 32
micro-batches of 64 took 2,040 ms a step (~19 us an op); 4 of 512 should take ~0.25 s."""


class Trainer(phase_trainer.PhaseTrainer):
    centre_latents = True

    def build_models(self) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
        models = spec.build_models()
        # T5's relative-position bias is trained: under SDPA it becomes a float mask that needs a
        # gradient (memory-efficient attention's bias-gradient path); eager attention (T5's own
        # matmuls) keeps the training step on plain GEMMs. Inference keeps the default.
        models["text_encoder_2"].set_attn_implementation("eager")
        self.tok_files = default_model_spec.load_tokenizer_files(Path(self.args.tokenizer))
        self.clip_tok, self.t5_tok = spec.tokenizers(self.tok_files, Path(self.args.ckpt) / "tokenizer")
        return models.pop("vae"), models

    def setup_denoiser_phase(self) -> None:
        from diffusers import FluxPipeline
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        super().setup_denoiser_phase()
        self.clip_ids = self.tokenize_all(self.clip_tok, spec.CLIP_LENGTH)
        # the T5 slot reads the same BPE, only shorter: every prompt of the world fits, so cut, not re-read
        table, empty = self.clip_ids
        if not bool((table[..., spec.T5_LENGTH - 1] == self.t5_tok.pad_token_id).all()):
            raise SystemExit(f"a prompt of the world is longer than the T5 slot's {spec.T5_LENGTH} tokens")
        self.t5_ids = table[..., : spec.T5_LENGTH], empty[..., : spec.T5_LENGTH]
        side = LATENT_SIDE // 2
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, self.dev, torch.float32)
        self.txt_ids = torch.zeros(spec.T5_LENGTH, 3, device=self.dev)
        s = spec.SCHEDULER
        mu = calculate_shift(side * side, s["base_image_seq_len"], s["max_image_seq_len"], s["base_shift"],
                             s["max_shift"])  # fmt: skip
        self.time_shift = float(torch.tensor(mu).exp())
        log(f"rectified flow: 16 image tokens -> time shift {self.time_shift:.3f} (as at inference)")
        check_inputs(self.parts, {"text_encoder": self.clip_ids, "text_encoder_2": self.t5_ids},
                     self.txt_ids, self.img_ids, self.vae.config.latent_channels)  # fmt: skip

    def denoiser_loss(self) -> torch.Tensor:
        from diffusers import FluxPipeline

        z0, (clip_ids, t5_ids) = self.sample_batch([self.clip_ids, self.t5_ids])
        b, c, h, w = z0.shape
        noise = torch.randn_like(z0)
        t = torch.sigmoid(torch.randn(b, device=self.dev))  # logit-normal
        t = self.time_shift * t / (1 + (self.time_shift - 1) * t)  # the scheduler's shift, t = sigma
        tb = t.view(b, 1, 1, 1)
        xt = (1 - tb) * z0 + tb * noise
        target = FluxPipeline._pack_latents(noise - z0, b, c, h, w)
        with sdpa_kernel(SDPBackend.MATH):  # float32 (TF32 matmuls): see CUDA_MICRO_BATCH
            pooled = self.parts["text_encoder"](clip_ids).pooler_output
            context = self.parts["text_encoder_2"](t5_ids)[0]
            pred = self.parts["transformer"](
                hidden_states=FluxPipeline._pack_latents(xt, b, c, h, w), timestep=t,
                pooled_projections=pooled, encoder_hidden_states=context,
                txt_ids=self.txt_ids, img_ids=self.img_ids, return_dict=False,
            )[0]  # fmt: skip
        return F.mse_loss(pred.float(), target)

    def export(self, out: Path) -> dict[str, int]:
        models = {"vae": self.vae, **self.ema}
        counts = spec.parameter_counts(models)
        models = {name: m.to("cpu") for name, m in models.items()}
        spec.save_pipeline(
            out, models, self.tok_files, self.state["shift_factor"], self.state["scaling_factor"]
        )
        log(f"exported pipeline to {out}")
        return counts


def check_inputs(
    parts: dict[str, torch.nn.Module],
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
    latent_channels: int,
) -> None:
    """Every token id any batch can draw, and the position ids, against what the models index: on
    CUDA an id past an embedding table is an illegal memory access reported later by some other
    kernel, so check the tables once, on the host, before the first step."""
    for name, (table, empty) in tables.items():
        encoder = parts[name]
        vocab = encoder.get_input_embeddings().num_embeddings
        positions = getattr(encoder.config, "max_position_embeddings", None)
        for ids in (table, empty):
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise SystemExit(f"{name}: token ids span {low}..{high}, its vocabulary has {vocab}")
            if positions is not None and ids.shape[-1] > positions:
                raise SystemExit(f"{name}: {ids.shape[-1]} tokens, {positions} positions")
    cfg = parts["transformer"].config
    context = tables["text_encoder_2"][0].shape[-1]
    if txt_ids.shape != (context, 3) or img_ids.shape != ((LATENT_SIDE // 2) ** 2, 3):
        raise SystemExit(f"position ids {tuple(txt_ids.shape)} / {tuple(img_ids.shape)} do not match "
                         f"{context} text and {(LATENT_SIDE // 2) ** 2} image tokens")  # fmt: skip
    widths = {
        "sum of axes_dims_rope (the head dim)": (sum(cfg.axes_dims_rope), cfg.attention_head_dim),
        "in_channels (2x2 patches of the latents)": (cfg.in_channels, 4 * latent_channels),
        "joint_attention_dim (T5's width)": (cfg.joint_attention_dim, parts["text_encoder_2"].config.d_model),
        "pooled_projection_dim (CLIP's width)": (
            cfg.pooled_projection_dim,
            parts["text_encoder"].config.hidden_size,
        ),
    }
    for what, (got, want) in widths.items():
        if got != want:
            raise SystemExit(f"transformer {what}: {got}, expected {want}")


def export_random(out: Path, args: argparse.Namespace, shift: float, scale: float) -> None:
    """A model of the same config, freshly initialised (seed + 1): the floor the trained one must clear."""
    torch.manual_seed(args.seed + 1)
    models = spec.build_models()
    spec.save_pipeline(
        out, models, default_model_spec.load_tokenizer_files(Path(args.tokenizer)), shift, scale
    )


def pack(folder: Path, dest: Path) -> list[Path]:
    """Tar ``folder`` and split it into parts of at most PART_BYTES: flux-model.tar.part-aa, -ab, ..."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(folder), arcname=folder.name)
    data = buffer.getvalue()
    chunks = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    if len(chunks) > MAX_PARTS:
        raise SystemExit(f"the model is {len(data) / 2**20:.1f} MiB: more than {MAX_PARTS} parts")
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("flux-model.tar.part-*"):
        stale.unlink()
    paths = []
    for i, chunk in enumerate(chunks):
        path = dest / f"flux-model.tar.part-a{'abcdefghij'[i]}"
        path.write_bytes(chunk)
        paths.append(path)
    log(f"packed {len(data) / 2**20:.1f} MiB into {len(paths)} part(s) in {dest}")
    return paths


def weight_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    phase_trainer.add_common_arguments(p, "transformer", out=str(ROOT / "core/src/diffstack/models" / NAME),
                                       ckpt=str(ROOT / "out/train_flux_model"))  # fmt: skip
    p.add_argument("--tokenizer", default=str(ROOT / "core/src/diffstack/default_model/tokenizer"))
    p.add_argument("--eval-seeds", default="0,1,2")
    p.add_argument("--eval-steps", default="20,12,8", help="flow-Euler step counts scored")
    p.add_argument("--stats", default=None, help="the run's stats JSON (default: beside --out)")
    p.add_argument("--pack-to", default=None, help="also write the folder as tar parts and the stats here")
    args = p.parse_args(argv)
    if args.denoiser_micro_batch is None and args.device.startswith("cuda"):
        args.denoiser_micro_batch = CUDA_MICRO_BATCH
    return phase_trainer.finish_arguments(args)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    trainer = Trainer(args)
    diverged = False
    try:
        finished = trainer.run()
    except phase_trainer.TrainingDiverged:
        if not args.export_on_stop:
            raise
        finished = diverged = True  # exported below (the EMA never took a non-finite step), exit 5
    if not finished:
        log("stopped at the run's wall limit; run again with the same --ckpt to resume")
        if not args.export_on_stop or trainer.state["phase"] == "vae":
            return 3
    out = Path(args.out)
    counts = trainer.export(out)
    facts = flux_model_card.Facts(
        counts=counts, state=trainer.state, args=vars(args), device=phase_trainer.device_name(args.device),
        torch=torch.__version__, time_shift=getattr(trainer, "time_shift", 0.0),
    )  # fmt: skip
    del trainer
    rows, random_rows = [], []
    if args.pack_to:  # the weights travel even if the evaluation is cut short; packed again below
        flux_model_card.finish(out, facts, rows, random_rows)
        pack(out, Path(args.pack_to))
    if args.eval:
        t0 = time.time()
        random_dir = out.with_name(out.name + "-random")
        export_random(random_dir, args, facts.state["shift_factor"], facts.state["scaling_factor"])
        rows, random_rows = flux_model_card.evaluate_models(out, random_dir, args)
        shutil.rmtree(random_dir, ignore_errors=True)
        facts.eval_s = time.time() - t0
        log(f"evaluation took {facts.eval_s:.1f} s")
    flux_model_card.finish(out, facts, rows, random_rows)
    stats = {
        "name": NAME, "finished": finished and not diverged, "diverged": diverged, "device": facts.device,
        "torch": facts.torch,
        "counts": counts, "state": facts.state, "args": vars(args), "time_shift": facts.time_shift,
        "files": weight_files(out), "eval_s": facts.eval_s, "run_s": time.time() - started,
        "rows": [dataclasses.asdict(r) for r in rows],
        "random_rows": [dataclasses.asdict(r) for r in random_rows],
    }  # fmt: skip
    stats_path = Path(args.stats) if args.stats else out.with_name(out.name + ".stats.json")
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path.write_text(json.dumps(stats, indent=2, default=str) + "\n")
    biggest = max(stats["files"].values())
    log(f"model {sum(stats['files'].values()) / 1e6:.1f} MB, biggest file {biggest / 2**20:.2f} MiB; "
        f"stats in {stats_path}; whole run {stats['run_s']:.0f} s")  # fmt: skip
    if args.pack_to:
        pack(out, Path(args.pack_to))
        shutil.copy(stats_path, Path(args.pack_to) / "flux_model_stats.json")
    return 5 if diverged else 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
