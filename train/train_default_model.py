"""Train the embedded default model (synthetic-shapes-64) from scratch: seeded, resumable, bounded.

    python train/train_default_model.py --device cuda --budget-minutes 6.5 --max-run-minutes 7.5 \
        --export-on-stop --eval        # what made the shipped model: 7.5 min on one H100

Needs torch, diffusers, transformers and numpy/Pillow only (it imports diffstack.synthetic from
core/src, not the installed core). CPU smoke test: --device cpu --vae-steps 2 --unet-steps 2
--vae-batch 4 --unet-batch 8 --out /tmp/m --ckpt /tmp/c.

The run is phase_trainer's (VAE, then text encoder + denoiser, checkpointed and planned from the
measured speed); phase 2 here trains the CLIP text encoder and the UNet jointly with an epsilon loss,
min-SNR-5 weighted, on SD1.5's schedule. --eval scores the exported model with the quality harness
over a guidance sweep at 20 Euler steps and puts the table into the model card.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core" / "src"))  # diffstack.synthetic without installing the core
sys.path.insert(0, str(Path(__file__).resolve().parent))

import default_model_spec as spec  # noqa: E402
import model_card  # noqa: E402
import phase_trainer  # noqa: E402

MIN_SNR = 5.0


def sd_alphas_cumprod(device: torch.device) -> torch.Tensor:
    """SD1.5's noise schedule ("scaled_linear" betas) as cumulative alphas, fp32 on ``device``."""
    lo, hi = float(spec.SCHEDULE["beta_start"]) ** 0.5, float(spec.SCHEDULE["beta_end"]) ** 0.5
    betas = torch.linspace(lo, hi, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float().to(device)


def epsilon_loss(
    unet: torch.nn.Module, z0: torch.Tensor, cond: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Noise ``z0`` (scaled latents) at random timesteps; the UNet's epsilon loss with min-SNR-5."""
    b = z0.shape[0]
    noise = torch.randn_like(z0)
    t = torch.randint(0, 1000, (b,), device=z0.device)
    ac = alphas_cumprod[t].view(b, 1, 1, 1)
    zt = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
    pred = unet(zt, t, cond).sample.float()
    snr = (ac / (1 - ac)).view(b)
    weight = torch.clamp(snr, max=MIN_SNR) / snr  # min-SNR-5 for epsilon prediction
    return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()


class Trainer(phase_trainer.PhaseTrainer):
    def build_models(self) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
        vae, text, unet = spec.build_models()
        self.tok_files = spec.load_tokenizer_files(Path(self.args.tokenizer))
        self.tokenizer = spec.make_tokenizer(self.tok_files, Path(self.args.ckpt) / "tokenizer")
        return vae, {"text": text, "unet": unet}

    def setup_denoiser_phase(self) -> None:
        super().setup_denoiser_phase()
        self.ids = self.tokenize_all(self.tokenizer, 77)
        self.alphas_cumprod = sd_alphas_cumprod(self.dev)

    def denoiser_loss(self) -> torch.Tensor:
        z0, (ids,) = self.sample_batch([self.ids])
        with self.amp:
            cond = self.parts["text"](ids)[0]
            return epsilon_loss(self.parts["unet"], z0, cond, self.alphas_cumprod)

    def export(self, out: Path) -> dict[str, int]:
        counts = spec.parameter_counts(self.vae, self.ema["text"], self.ema["unet"])
        vae, text, unet = (m.to("cpu") for m in (self.vae, self.ema["text"], self.ema["unet"]))
        spec.save_pipeline(out, vae, text, unet, self.tok_files, self.state["scaling_factor"])
        phase_trainer.log(f"exported pipeline to {out}")
        return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    phase_trainer.add_common_arguments(p, "unet", out=str(ROOT / "core/src/diffstack/default_model"),
                                       ckpt=str(ROOT / "out/train_default_model"))  # fmt: skip
    p.add_argument("--tokenizer", default=str(ROOT / "core/src/diffstack/default_model/tokenizer"))
    p.add_argument("--default-guidance", type=float, default=4.0, help="written to diffstack.json")
    p.add_argument("--guidances", default="1,2,3,4,5,7.5")
    return phase_trainer.finish_arguments(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trainer = Trainer(args)
    finished = trainer.run()
    if not finished:
        phase_trainer.log("stopped at the run's wall limit; run again with the same --ckpt to resume")
        if not args.export_on_stop or trainer.state["phase"] == "vae":
            return 3
    counts = trainer.export(Path(args.out))
    card = model_card.TrainingFacts(
        counts=counts, state=trainer.state, args=vars(args),
        device=phase_trainer.device_name(args.device), torch=torch.__version__,
    )  # fmt: skip
    model_card.finish(Path(args.out), card, evaluate=args.eval, samples=args.samples)
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
