"""The two-phase training run the embedded models share: seeded, resumable, bounded by wall time.

1. AutoencoderKL on every ground-truth scene of the synthetic world (L1 + MSE + a tiny KL), then the
   latent normalisation measured from the data (scaling factor = 1 / std, and for FLUX-style VAEs the
   shift = mean, as SD and FLUX measured theirs).
2. The text encoder(s) and the denoiser jointly, with the subclass's objective. Prompts leave out
   optional attributes 10% of the time each, and 10% are empty, so classifier-free guidance works and
   short prompts ("a red circle") still draw a sensible picture.

Both phases checkpoint to --ckpt, so a later run resumes where the last stopped (--max-run-minutes
ends a run cleanly; the step plan is stored, so resuming gives the same schedule). Step counts are
planned from the measured speed to fit --budget-minutes. The exported weights are the EMA ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import random
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from diffstack.synthetic.scenes import OPTIONAL_ATTRIBUTES, all_scenes, render_batch

P_OMIT, P_UNCOND = 0.1, 0.1
PLAN_FROM, PLAN_OVER = 10, 100
MAX_SKIPPED = 10
"""Denoiser steps with a non-finite loss or gradient that are skipped before the run stops (exit 5)."""
"""The step count is planned from the speed of steps PLAN_FROM .. PLAN_FROM + PLAN_OVER."""


class TrainingDiverged(SystemExit):
    """More than MAX_SKIPPED non-finite denoiser steps: exit 5 unless the caller exports what it has
    (the weights and their EMA never took a non-finite update)."""

    def __init__(self) -> None:
        super().__init__(5)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up (at most a fifth of the run: a short planned run still reaches the peak), then
    cosine down to 10% of the peak."""
    warmup = max(1, min(warmup, total // 5))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


class PhaseTrainer:
    """A VAE phase, then a denoiser phase; subclasses build the models and define the denoiser step.

    ``parts`` are the modules trained in phase 2 (text encoders and denoiser), each with an EMA copy.
    """

    centre_latents = False
    """Whether the latents are shifted by their mean before scaling (FLUX's VAE) or only scaled (SD's)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dev = args, torch.device(args.device)
        self.ckpt = Path(args.ckpt) / "state.pt"
        torch.manual_seed(args.seed)
        self.vae, self.parts = self.build_models()
        self.ema = {name: frozen_copy(m) for name, m in self.parts.items()}
        self.scenes = all_scenes()
        images = torch.from_numpy(render_batch(self.scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.images = images.to(self.dev)
        self.state: dict[str, Any] = {
            "phase": "vae",
            "step": 0,
            "total": None,
            "totals": {},
            "wall": {"vae": 0.0, "denoiser": 0.0},
            "scaling_factor": None,
            "shift_factor": None,
        }
        self.opt: torch.optim.Optimizer | None = None
        self.micro_batch = args.denoiser_batch
        """How many examples sample_batch draws: the current micro-batch of the denoiser step."""
        self.batch_shapes: dict[str, Any] = {}
        self.skipped_steps = 0
        self.run_start = time.time()
        self.last_save = time.time()
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dev.type == "cuda")
        for m in (self.vae, *self.parts.values(), *self.ema.values()):
            m.to(self.dev)

    # ---- what a model family supplies -------------------------------------------------------
    def build_models(self) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
        raise NotImplementedError

    def setup_denoiser_phase(self) -> None:
        """Prepare phase 2 (latents, token ids); subclasses add their own tables."""
        self.lat_mean, self.lat_std = self.encode_all()
        self.vae.requires_grad_(False)
        for m in self.parts.values():
            m.train()

    def denoiser_loss(self) -> torch.Tensor:
        raise NotImplementedError

    def export(self, out: Path) -> dict[str, int]:
        raise NotImplementedError

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "state": self.state, "vae": self.vae.state_dict(),
            "parts": {n: m.state_dict() for n, m in self.parts.items()},
            "ema": {n: m.state_dict() for n, m in self.ema.items()},
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
        self.vae.load_state_dict(blob["vae"])
        for name, m in self.parts.items():
            m.load_state_dict(blob["parts"][name])
            self.ema[name].load_state_dict(blob["ema"][name])
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

    def denoiser_params(self) -> list[torch.nn.Parameter]:
        return [p for m in self.parts.values() for p in m.parameters()]

    def _make_optimizer(self) -> None:
        a = self.args
        if self.state["phase"] == "vae":
            self.opt = torch.optim.AdamW(
                self.vae.parameters(), lr=a.vae_lr, betas=(0.9, 0.99), weight_decay=0.0
            )
        elif self.state["phase"] == "denoiser":
            params = self.denoiser_params()
            self.opt = torch.optim.AdamW(params, lr=a.denoiser_lr, betas=(0.9, 0.99), weight_decay=0.01)
        else:
            self.opt = None

    # ---- the step loop shared by both phases ------------------------------------------------
    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

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
            if st["step"] % self.args.log_every == 0 or st["step"] == (st["total"] or 0) - 1:
                log(f"{phase} step {st['step']}/{st['total']} loss {loss:.5f} lr {lr:.2e}")
            st["step"] += 1
            if st["step"] % 50 == 0:
                self._sync()
            st["wall"][phase] += time.time() - t0
            if st["total"] is None:  # plan the step count from measured speed, once, then keep it
                if st["step"] == PLAN_FROM:
                    self._sync()
                    timed_from = (st["step"], time.time())
                elif timed_from and st["step"] == timed_from[0] + PLAN_OVER:
                    self._sync()
                    per_step = (time.time() - timed_from[1]) / PLAN_OVER
                    st["total"] = max(st["step"] + 1, int(budget_s / per_step))
                    log(f"{phase}: {per_step * 1000:.1f} ms/step -> plan {st['total']} steps")
                elif st["wall"][phase] > budget_s:  # too slow to plan (a CPU smoke run): stop here
                    st["total"] = st["step"]
                    log(f"{phase}: budget spent before planning -> {st['total']} steps")
            if time.time() - self.last_save > self.args.save_every:
                self.save()
        st["totals"][phase] = st["total"]
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
        return float(loss.detach()) if step % self.args.log_every == 0 else 0.0

    @torch.no_grad()
    def encode_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every scene (fp32), and the measured latent normalisation."""
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
            shift = float(sample.mean()) if self.centre_latents else 0.0
            self.state["shift_factor"] = shift
            self.state["scaling_factor"] = float(1.0 / (sample - shift).std())
            log(f"latent std {float(sample.std()):.4f} mean {float(sample.mean()):.4f} -> "
                f"shift_factor {shift:.5f} scaling_factor {self.state['scaling_factor']:.5f}")  # fmt: skip
        return mean, std

    # ---- phase 2 helpers --------------------------------------------------------------------
    def tokenize_all(self, tokenizer: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of every scene under every subset of left-out optional attributes,
        (N, 2^k, length), and of the empty prompt, (1, length)."""
        subsets = [tuple(a for a, keep in zip(OPTIONAL_ATTRIBUTES, bits, strict=True) if not keep)
                   for bits in itertools.product((True, False), repeat=len(OPTIONAL_ATTRIBUTES))]  # fmt: skip
        prompts = [s.prompt(omit=sub) for s in self.scenes for sub in subsets]

        def ids_of(texts: list[str]) -> torch.Tensor:
            return tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids.to(self.dev)  # fmt: skip

        return ids_of(prompts).view(len(self.scenes), len(subsets), length), ids_of([""])

    def sample_batch(
        self, tables: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A training batch: normalised latents (one posterior sample per scene) and, per token table,
        the prompt ids with attributes left out and empty prompts drawn as described above."""
        b, dev = self.micro_batch, self.dev
        idx = torch.randint(0, len(self.scenes), (b,), device=dev)
        omit_bits = (torch.rand(b, len(OPTIONAL_ATTRIBUTES), device=dev) < P_OMIT).long()
        weights = 2 ** torch.arange(len(OPTIONAL_ATTRIBUTES) - 1, -1, -1, device=dev)
        variant = (omit_bits * weights).sum(1)  # matches tokenize_all's subset order
        uncond = torch.rand(b, 1, device=dev) < P_UNCOND
        ids = [torch.where(uncond, empty, table[idx, variant]) for table, empty in tables]
        z0 = self.lat_mean[idx] + self.lat_std[idx] * torch.randn_like(self.lat_mean[idx])
        z0 = (z0 - self.state["shift_factor"]) * self.state["scaling_factor"]
        self.batch_shapes = {"latents": tuple(z0.shape), "token_ids": [tuple(t.shape) for t in ids]}
        return z0, ids

    def denoiser_step(self, step: int) -> float:
        """One optimizer step over --denoiser-batch examples, drawn and back-propagated in micro-batches
        of at most --denoiser-micro-batch (each loss weighted by its share, so the gradient is the
        whole batch's). Small micro-batches keep every GEMM and activation of a step small on the GPU."""
        self.opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        batch, micro = self.args.denoiser_batch, self.args.denoiser_micro_batch
        total = torch.zeros((), device=self.dev)
        for start in range(0, batch, micro):
            self.micro_batch = min(micro, batch - start)
            try:
                loss = self.denoiser_loss() * (self.micro_batch / batch)
                loss.backward()
                if step < 3:  # surface an asynchronous CUDA error here, with this micro-batch's shapes
                    self._sync()
            except RuntimeError as err:  # a CUDA/cuBLAS failure: say what was running, then stop at once
                self.report_failed_step(step, start, err)
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.denoiser_params(), 1.0)
        # One host sync a step, small beside the step's GPU work: a non-finite loss or gradient never
        # reaches the weights (or their EMA). A few such batches are skipped; persistent ones stop the run.
        if not bool(torch.isfinite(total) & torch.isfinite(norm)):
            self.skipped_steps += 1
            log(f"denoiser step {step}: loss {float(total)}, gradient norm {float(norm)}: update skipped "
                f"({self.skipped_steps} so far)")  # fmt: skip
            if self.skipped_steps > MAX_SKIPPED:
                log("too many non-finite steps; stopping before the weights take one")
                raise TrainingDiverged
            return float(total)
        self.opt.step()  # type: ignore[union-attr]
        decay = min(self.args.ema, (1 + step) / (10 + step))
        for name, live in self.parts.items():
            ema_p: list[torch.Tensor] = list(self.ema[name].parameters())
            torch._foreach_lerp_(ema_p, [p.detach() for p in live.parameters()], 1 - decay)
        return float(total)  # already synchronised by the finiteness check

    def report_failed_step(self, step: int, start: int, err: RuntimeError) -> NoReturn:
        """Log the failing step's shapes and memory, and exit non-zero without saving a checkpoint."""
        a = self.args
        log(f"denoiser step {step} FAILED in the micro-batch at {start} of {a.denoiser_batch} "
            f"(micro-batch {self.micro_batch}, at most {a.denoiser_micro_batch}): "
            f"shapes {self.batch_shapes}; {type(err).__name__}: {err}")  # fmt: skip
        if self.dev.type == "cuda":
            with contextlib.suppress(RuntimeError):  # the context may be unusable after the error
                log(f"CUDA memory: allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
                    f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")  # fmt: skip
        raise SystemExit(4)

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
            self.state.update(phase="denoiser", step=0, total=None)
            self.encode_all()
            self._make_optimizer()
            self.save()
        if self.state["phase"] == "denoiser":
            self.setup_denoiser_phase()
            done = self._loop("denoiser", self.args.denoiser_steps, budget * (1 - self.args.vae_fraction),
                              self.denoiser_step, self.args.denoiser_lr)  # fmt: skip
            if not done:
                return False
            self.state.update(phase="done")
            self.save()
        return True


def add_common_arguments(p: argparse.ArgumentParser, denoiser: str, out: str, ckpt: str) -> None:
    """The flags both trainers take; the phase-2 flags are named after the denoiser (--unet-steps)."""
    on_gpu = torch.cuda.is_available()
    p.add_argument("--out", default=out)
    p.add_argument("--ckpt", default=ckpt)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=12.0, help="training time of both phases")
    p.add_argument("--max-run-minutes", type=float, default=1e9, help="checkpoint and stop after this")
    p.add_argument("--vae-fraction", type=float, default=0.2)
    p.add_argument("--vae-steps", default="auto", help="'auto' plans from measured speed and the budget")
    p.add_argument(f"--{denoiser}-steps", dest="denoiser_steps", default="auto")
    p.add_argument("--vae-batch", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    p.add_argument(f"--{denoiser}-batch", dest="denoiser_batch", type=int, default=None,
                   help="default: 2048 on CUDA, 16 on CPU")  # fmt: skip
    p.add_argument(f"--{denoiser}-micro-batch", dest="denoiser_micro_batch", type=int, default=None,
                   help="examples per forward/backward, accumulated to the batch (default: all)")  # fmt: skip
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument(f"--{denoiser}-lr", dest="denoiser_lr", type=float, default=5e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=200, help="steps (at most a fifth of the planned run)")
    p.add_argument("--log-every", type=int, default=100, help="steps between loss lines")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--eval", action="store_true", help="score the exported model and write its card")
    p.add_argument("--eval-scenes", "--eval-prompts", dest="eval_scenes", type=int, default=96)
    p.add_argument("--samples", default=None, help="write a PNG grid: generated above ground truth")
    p.add_argument("--export-on-stop", action="store_true", help="export even when stopped early")


def finish_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults and seed every generator."""
    cuda = args.device.startswith("cuda")
    args.vae_batch = args.vae_batch or (128 if cuda else 8)
    args.denoiser_batch = args.denoiser_batch or (2048 if cuda else 16)
    args.denoiser_micro_batch = min(args.denoiser_micro_batch or args.denoiser_batch, args.denoiser_batch)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    log(f"device {device_name(args.device)}, torch {torch.__version__}")
    return args


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
