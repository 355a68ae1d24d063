"""Train the embedded default model (synthetic-shapes-64) from scratch: seeded, resumable, bounded.

    python train/train_default_model.py --device cuda --budget-minutes 6.5 --max-run-minutes 7.5 \
        --export-on-stop --eval        # what made the shipped model: 7.5 min on one H100

Needs torch, diffusers, transformers and numpy/Pillow only (it imports diffstack.synthetic from
core/src, not the installed core). CPU smoke test: --device cpu --vae-steps 2 --unet-steps 2
--vae-batch 4 --unet-batch 8 --out /tmp/m --ckpt /tmp/c.

Two phases, each checkpointed to --ckpt so a later run resumes where the last one stopped
(--max-run-minutes ends a run cleanly; the step plan is stored, so resuming gives the same schedule):
1. AutoencoderKL on every ground-truth scene (L1 + MSE + a tiny KL), then the latent scaling factor
   = 1 / std of the latents, as SD measured its 0.18215.
2. CLIP text encoder + UNet jointly, epsilon loss with min-SNR-5 weighting on SD1.5's schedule.
   Prompts leave out optional attributes 10% of the time each, and 10% are empty, so classifier-free
   guidance works and short prompts ("a red circle") still draw a sensible picture.
The exported pipeline holds the EMA weights. --eval scores it with the quality harness over a
guidance sweep at 20 Euler steps and puts the table into the model card.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core" / "src"))  # diffstack.synthetic without installing the core
sys.path.insert(0, str(Path(__file__).resolve().parent))

import default_model_spec as spec  # noqa: E402
import model_card  # noqa: E402

from diffstack.synthetic.scenes import OPTIONAL_ATTRIBUTES, all_scenes, render_batch  # noqa: E402

P_OMIT, P_UNCOND, MIN_SNR = 0.1, 0.1, 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dev = args, torch.device(args.device)
        self.ckpt = Path(args.ckpt) / "state.pt"
        torch.manual_seed(args.seed)
        self.vae, self.text, self.unet = spec.build_models()
        self.ema = {"text": self._copy(self.text), "unet": self._copy(self.unet)}
        self.tok_files = spec.load_tokenizer_files(Path(args.tokenizer))
        self.tokenizer = spec.make_tokenizer(self.tok_files, Path(args.ckpt) / "tokenizer")
        self.scenes = all_scenes()
        self.images = torch.from_numpy(render_batch(self.scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.images = self.images.to(self.dev)
        self.state: dict[str, Any] = {
            "phase": "vae",
            "step": 0,
            "total": None,
            "elapsed": 0.0,
            "wall": {"vae": 0.0, "unet": 0.0},
            "scaling_factor": None,
        }
        self.opt: torch.optim.Optimizer | None = None
        self.run_start = time.time()
        self.last_save = time.time()
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dev.type == "cuda")
        for m in (self.vae, self.text, self.unet, *self.ema.values()):
            m.to(self.dev)

    @staticmethod
    def _copy(model: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(model).requires_grad_(False).eval()

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "state": self.state, "vae": self.vae.state_dict(), "text": self.text.state_dict(),
            "unet": self.unet.state_dict(), "ema_text": self.ema["text"].state_dict(),
            "ema_unet": self.ema["unet"].state_dict(),
            "opt": self.opt.state_dict() if self.opt else None,
            "rng": {
                "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if self.dev.type == "cuda" else None,
            },
        }  # fmt: skip
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(self.ckpt)
        self.last_save = time.time()
        log(f"checkpoint: phase={self.state['phase']} step={self.state['step']}/{self.state['total']}")

    def load(self) -> bool:
        if not self.ckpt.exists():
            return False
        blob = torch.load(self.ckpt, map_location=self.dev, weights_only=False)
        self.state = blob["state"]
        for name in ("vae", "text", "unet"):
            getattr(self, name).load_state_dict(blob[name])
        self.ema["text"].load_state_dict(blob["ema_text"])
        self.ema["unet"].load_state_dict(blob["ema_unet"])
        self._make_optimizer()
        if blob["opt"] is not None and self.opt is not None:
            self.opt.load_state_dict(blob["opt"])
        torch.set_rng_state(blob["rng"]["torch"].cpu())
        np.random.set_state(blob["rng"]["numpy"])
        random.setstate(blob["rng"]["python"])
        if blob["rng"]["cuda"] is not None and self.dev.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in blob["rng"]["cuda"]])
        log(f"resumed: phase={self.state['phase']} step={self.state['step']}/{self.state['total']}")
        return True

    def _make_optimizer(self) -> None:
        if self.state["phase"] == "vae":
            params = list(self.vae.parameters())
            self.opt = torch.optim.AdamW(params, lr=self.args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        elif self.state["phase"] == "unet":
            params = list(self.unet.parameters()) + list(self.text.parameters())
            self.opt = torch.optim.AdamW(params, lr=self.args.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
        else:
            self.opt = None

    # ---- the step loop shared by both phases ------------------------------------------------
    # The training loop, kept in one piece so a reader sees every stop condition together.
    def _loop(self, phase: str, requested: str, budget_s: float, step_fn: Any, peak_lr: float) -> bool:  # noqa: C901
        """Run steps until the phase's plan is done (True) or this run's wall limit is hit (False)."""
        st = self.state
        if st["total"] is None and requested != "auto":
            st["total"] = int(requested)
        timed_from: tuple[int, float] | None = None
        while st["total"] is None or st["step"] < st["total"]:
            if time.time() - self.run_start > self.args.max_run_minutes * 60:
                self.save()
                return False
            lr = lr_at(st["step"], st["total"] or 10**9, peak_lr, self.args.warmup)
            for group in self.opt.param_groups:  # type: ignore[union-attr]
                group["lr"] = lr
            t0 = time.time()
            loss = step_fn(st["step"])
            if st["step"] % 100 == 0 or st["step"] == (st["total"] or 0) - 1:
                log(f"{phase} step {st['step']}/{st['total']} loss {loss:.5f} lr {lr:.2e}")
            st["step"] += 1
            if self.dev.type == "cuda" and st["step"] % 50 == 0:
                torch.cuda.synchronize()
            st["wall"][phase] += time.time() - t0
            if st["total"] is None:  # plan the step count from measured speed, once, then keep it
                if st["step"] == 10:
                    if self.dev.type == "cuda":
                        torch.cuda.synchronize()
                    timed_from = (st["step"], time.time())
                elif timed_from and st["step"] == timed_from[0] + 100:
                    if self.dev.type == "cuda":
                        torch.cuda.synchronize()
                    per_step = (time.time() - timed_from[1]) / 100
                    st["total"] = max(st["step"] + 1, int(budget_s / per_step))
                    log(f"{phase}: {per_step * 1000:.1f} ms/step -> plan {st['total']} steps")
            if time.time() - self.last_save > self.args.save_every:
                self.save()
        return True

    # ---- phase 1: autoencoder ---------------------------------------------------------------
    def vae_step(self, step: int) -> float:
        idx = torch.randint(0, len(self.images), (self.args.vae_batch,), device=self.dev)
        x = self.images[idx]
        with self.amp:
            post = self.vae.encode(x).latent_dist
            rec = self.vae.decode(post.sample()).sample.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + self.args.kl_weight * post.kl().mean()
        self.opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.opt.step()  # type: ignore[union-attr]
        return float(loss.detach()) if step % 100 == 0 else 0.0

    @torch.no_grad()
    def encode_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every scene (fp32), and the measured scaling factor."""
        self.vae.eval()
        means, stds = [], []
        for chunk in torch.split(self.images, 256):
            dist = self.vae.encode(chunk).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        if self.state["scaling_factor"] is None:
            g = torch.Generator(device=self.dev).manual_seed(self.args.seed)
            sample = mean + std * torch.randn(mean.shape, generator=g, device=self.dev)
            self.state["scaling_factor"] = float(1.0 / sample.std())
            log(f"latent std {float(sample.std()):.4f} mean {float(sample.mean()):.4f} "
                f"-> scaling_factor {self.state['scaling_factor']:.5f}")  # fmt: skip
        return mean, std

    # ---- phase 2: text encoder + UNet -------------------------------------------------------
    def tokenize_all(self) -> torch.Tensor:
        """Token ids of every scene under every subset of left-out optional attributes: (N, 2^k, 77)."""
        subsets = [tuple(a for a, keep in zip(OPTIONAL_ATTRIBUTES, bits, strict=True) if not keep)
                   for bits in itertools.product((True, False), repeat=len(OPTIONAL_ATTRIBUTES))]  # fmt: skip
        prompts = [s.prompt(omit=sub) for s in self.scenes for sub in subsets]
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids  # fmt: skip
        self.empty_ids = self.tokenizer([""], padding="max_length", max_length=77,
                                        return_tensors="pt").input_ids.to(self.dev)  # fmt: skip
        return ids.view(len(self.scenes), len(subsets), 77).to(self.dev)

    def setup_unet_phase(self) -> None:
        self.lat_mean, self.lat_std = self.encode_all()
        self.ids = self.tokenize_all()
        lo, hi = float(spec.SCHEDULE["beta_start"]) ** 0.5, float(spec.SCHEDULE["beta_end"]) ** 0.5
        betas = torch.linspace(lo, hi, 1000, dtype=torch.float64) ** 2  # SD's "scaled_linear"
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(self.dev)
        self.vae.requires_grad_(False)
        self.unet.train()
        self.text.train()

    def unet_step(self, step: int) -> float:
        b, dev = self.args.unet_batch, self.dev
        idx = torch.randint(0, len(self.scenes), (b,), device=dev)
        omit_bits = (torch.rand(b, len(OPTIONAL_ATTRIBUTES), device=dev) < P_OMIT).long()
        variant = (omit_bits * torch.tensor([4, 2, 1], device=dev)).sum(1)  # matches tokenize_all
        ids = self.ids[idx, variant]
        ids = torch.where((torch.rand(b, 1, device=dev) < P_UNCOND), self.empty_ids, ids)
        z0 = self.lat_mean[idx] + self.lat_std[idx] * torch.randn_like(self.lat_mean[idx])
        z0 = z0 * self.state["scaling_factor"]
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (b,), device=dev)
        ac = self.alphas_cumprod[t].view(b, 1, 1, 1)
        zt = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
        with self.amp:
            cond = self.text(ids)[0]
            pred = self.unet(zt, t, cond).sample.float()
        snr = (ac / (1 - ac)).view(b)
        weight = torch.clamp(snr, max=MIN_SNR) / snr  # min-SNR-5 for epsilon prediction
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        self.opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        loss.backward()
        params = list(self.unet.parameters()) + list(self.text.parameters())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()  # type: ignore[union-attr]
        decay = min(self.args.ema, (1 + step) / (10 + step))
        for name, live in (("text", self.text), ("unet", self.unet)):
            ema_p: list[torch.Tensor] = list(self.ema[name].parameters())
            torch._foreach_lerp_(ema_p, [p.detach() for p in live.parameters()], 1 - decay)
        return float(loss.detach()) if step % 100 == 0 else 0.0

    # ---- driver -----------------------------------------------------------------------------
    def run(self) -> bool:
        if not self.load():
            self._make_optimizer()
        budget = self.args.budget_minutes * 60
        if self.state["phase"] == "vae":
            self.vae.train()
            done = self._loop("vae", self.args.vae_steps, budget * self.args.vae_fraction,
                              self.vae_step, self.args.vae_lr)  # fmt: skip
            if not done:
                return False
            self.state.update(phase="unet", step=0, total=None)
            self.encode_all()
            self._make_optimizer()
            self.save()
        if self.state["phase"] == "unet":
            self.setup_unet_phase()
            done = self._loop("unet", self.args.unet_steps, budget * (1 - self.args.vae_fraction),
                              self.unet_step, self.args.unet_lr)  # fmt: skip
            if not done:
                return False
            self.state.update(phase="done")
            self.save()
        return True

    def export(self, out: Path) -> dict[str, int]:
        counts = spec.parameter_counts(self.vae, self.ema["text"], self.ema["unet"])
        vae, text, unet = (m.to("cpu") for m in (self.vae, self.ema["text"], self.ema["unet"]))
        spec.save_pipeline(out, vae, text, unet, self.tok_files, self.state["scaling_factor"])
        log(f"exported pipeline to {out}")
        return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "core/src/diffstack/default_model"))
    p.add_argument("--ckpt", default=str(ROOT / "out/train_default_model"))
    p.add_argument("--tokenizer", default=str(ROOT / "core/src/diffstack/default_model/tokenizer"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=12.0, help="training time of both phases")
    p.add_argument("--max-run-minutes", type=float, default=1e9, help="checkpoint and stop after this")
    p.add_argument("--vae-fraction", type=float, default=0.2)
    p.add_argument("--vae-steps", default="auto", help="'auto' plans from measured speed and the budget")
    p.add_argument("--unet-steps", default="auto")
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--unet-batch", type=int, default=2048)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--eval", action="store_true", help="score the exported model and write its card")
    p.add_argument("--eval-scenes", type=int, default=96)
    p.add_argument("--default-guidance", type=float, default=4.0, help="written to diffstack.json")
    p.add_argument("--guidances", default="1,2,3,4,5,7.5")
    p.add_argument("--samples", default=None, help="write a PNG grid: generated above ground truth")
    p.add_argument("--export-on-stop", action="store_true", help="export even when stopped early")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    log(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}")  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    trainer = Trainer(args)
    finished = trainer.run()
    if not finished:
        log("stopped at the run's wall limit; run again with the same --ckpt to resume")
        if not args.export_on_stop or trainer.state["phase"] == "vae":
            return 3
    counts = trainer.export(Path(args.out))
    card = model_card.TrainingFacts(
        counts=counts, state=trainer.state, args=vars(args),
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
    )  # fmt: skip
    model_card.finish(Path(args.out), card, evaluate=args.eval, samples=args.samples)
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
