"""What previews add to a request's time: none, the linear latent-to-RGB previews, a full VAE decode.

    .venv/bin/python tests/reliability/preview_cost.py [--size 64 256] [--steps 8] [--repeats 10]

The real engine on CPU with the tiny SD1 model of the tests, one request at a time, a preview at every
step (the worst case: the server's rate cap, ``server.preview_interval_s``, only lowers it). Three
variants, interleaved so that drifting machine load hits them alike: no previews; the engine's
previews (:func:`diffstack.engine.previews.latent_previews`); and the full-size VAE decode then
thumbnail that they replaced (reproduced here, as it was, for the comparison). Prints the median
request time of each and the ratios to no previews as JSON; RELIABILITY.md records them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffstack.engine import Engine, GenerationJob, GenerationRequest, StepEvent
from diffstack.engine import run as engine_run
from diffstack.plugins import load_plugins
from diffstack.testing import baseline_settings, save_tiny_model
from diffstack.types import Family

MODEL = "tiny-sd1"
PREVIEW_SIDE = 256


def full_decode_previews(
    pipeline: Any, latents: torch.Tensor, width: int, height: int, max_side: int
) -> list[Image.Image]:
    """The replaced previews: the model's VAE decodes at the image's full size, then a thumbnail."""
    vae = pipeline.vae
    with torch.inference_mode():
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    images = pipeline.image_processor.postprocess(decoded, output_type="pil")
    for image in images:
        image.thumbnail((max_side, max_side))
    return images


def _request_seconds(engine: Engine, size: int, steps: int, previews: bool) -> float:
    request = engine.prepare(
        GenerationRequest("a red circle", width=size, height=size, steps=steps, seeds=(1,))
    )
    shown: list[Image.Image] = []

    def on_step(event: StepEvent) -> None:
        shown.extend(event.preview(PREVIEW_SIDE))

    started = time.perf_counter()
    engine.run([GenerationJob(request, on_step=on_step if previews else None)])
    seconds = time.perf_counter() - started
    if previews and len(shown) != steps:
        raise RuntimeError(f"{len(shown)} previews for {steps} steps")
    return seconds


def measure(sizes: list[int], steps: int, repeats: int) -> dict[str, Any]:
    variants: dict[str, tuple[bool, Callable[..., list[Image.Image]]]] = {
        "none": (False, engine_run.latent_previews),
        "linear": (True, engine_run.latent_previews),
        "full_decode": (True, full_decode_previews),
    }
    linear = engine_run.latent_previews
    with tempfile.TemporaryDirectory() as root:
        save_tiny_model(Family.SD1, Path(root) / MODEL, metadata={"weights": "random"})
        settings = baseline_settings(Path(root), MODEL)
        engine = Engine.start(settings, load_plugins(settings.plugins))
        rows = []
        try:
            for size in sizes:
                timings: dict[str, list[float]] = {name: [] for name in variants}
                for repeat in range(repeats + 1):  # the first round warms up and is dropped
                    for name, (previews, previewer) in variants.items():
                        engine_run.latent_previews = previewer  # type: ignore[attr-defined]
                        seconds = _request_seconds(engine, size, steps, previews)
                        if repeat:
                            timings[name].append(seconds)
                medians = {name: statistics.median(values) for name, values in timings.items()}
                rows.append(
                    {
                        "size": size,
                        "steps": steps,
                        **{f"{name}_s": round(value, 4) for name, value in medians.items()},
                        "linear_ratio": round(medians["linear"] / medians["none"], 3),
                        "full_decode_ratio": round(medians["full_decode"] / medians["none"], 3),
                    }
                )
        finally:
            engine_run.latent_previews = linear  # type: ignore[attr-defined]
    return {
        "model": MODEL,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(measure(args.size, args.steps, args.repeats), indent=2))


if __name__ == "__main__":
    main()
