"""The quality harness: what an optimization costs in picture quality, measured against ground truth.

Any stack configuration is a dict of keyword arguments for one callable,
``generate(prompts, seeds, **config) -> list[PIL.Image]`` (one image per (prompt, seed) pair, in
order). The harness generates a fixed, attribute-balanced prompt x seed set with it, reads every
image back with the deterministic analyser, and reports attribute accuracy (per attribute and
overall), PSNR and SSIM against the exact rendering, and wall time. The same rows render as a
markdown table (QUALITY.md) so the numbers and the code that made them cannot drift apart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from diffstack.synthetic.analysis import analyse
from diffstack.synthetic.scenes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    render,
)

GenerateFn = Callable[..., list[Image.Image]]


def fixed_scenes(n: int = 48, seed: int = 0) -> list[Scene]:
    """A deterministic prompt set in which every attribute value appears (nearly) equally often."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list[str]] = {}
    sources: tuple[tuple[str, Iterable[str]], ...] = (
        ("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
        ("position", POSITIONS), ("background", BACKGROUNDS),
    )  # fmt: skip
    for name, source in sources:
        values = list(source)
        tiled = (values * (n // len(values) + 1))[:n]
        columns[name] = [tiled[i] for i in rng.permutation(n)]
    backgrounds = list(BACKGROUNDS)
    scenes = []
    for i in range(n):
        attrs = {name: column[i] for name, column in columns.items()}
        while attrs["colour"] == attrs["background"]:  # the grammar forbids it: take the next one
            attrs["background"] = backgrounds[(backgrounds.index(attrs["background"]) + 1) % 4]
        scenes.append(Scene(**attrs))
    return scenes


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (capped at 100 for identical images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_filter(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Separable Gaussian blur over the first two axes, 'valid' region only."""
    k = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    k /= k.sum()
    x = sliding_window_view(x, size, axis=0) @ k
    return sliding_window_view(x, size, axis=1) @ k


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over RGB.

    Plain numpy, so the harness needs no scikit-image; it agrees with skimage's gaussian-weighted
    SSIM up to border handling (we average the valid region only).
    """
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _gaussian_filter(x), _gaussian_filter(y)
    vx = _gaussian_filter(x * x) - mx * mx
    vy = _gaussian_filter(y * y) - my * my
    cxy = _gaussian_filter(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


@dataclass(frozen=True)
class ImageScore:
    """One generated image against its scene."""

    correct: dict[str, bool]
    psnr: float
    ssim: float
    pixel_error: float = 0.0
    """Mean absolute difference from the exact rendering, in 0-255 levels per channel."""


def score_image(image: Image.Image | np.ndarray, scene: Scene) -> ImageScore:
    """Read the image back and compare with the scene and its exact rendering."""
    arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    reading = analyse(arr)
    truth = render(scene)
    correct = {a: getattr(reading, a) == getattr(scene, a) for a in ATTRIBUTES}
    error = float(np.abs(arr.astype(np.float64) - truth.astype(np.float64)).mean())
    return ImageScore(correct, psnr(arr, truth), ssim(arr, truth), error)


@dataclass(frozen=True)
class QualityRow:
    """Quality and time of one configuration over the whole prompt x seed set."""

    config: str
    images: int
    accuracy: dict[str, float]  # per attribute, fraction read back correctly
    overall: float  # mean of the per-attribute accuracies
    exact: float  # fraction of images with every attribute right
    psnr: float
    ssim: float
    seconds: float  # wall time of the timed generation call(s)
    settings: dict[str, Any] = field(default_factory=dict)
    pixel_error: float = 0.0  # mean absolute difference from the exact renderings, 0-255 levels

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(self.images, 1)


def summarise(
    config: str, scores: Sequence[ImageScore], seconds: float, settings: Mapping[str, Any]
) -> QualityRow:
    """Aggregate per-image scores into one row."""
    accuracy = {a: float(np.mean([s.correct[a] for s in scores])) for a in ATTRIBUTES}
    return QualityRow(
        config=config,
        images=len(scores),
        accuracy=accuracy,
        overall=float(np.mean(list(accuracy.values()))),
        exact=float(np.mean([all(s.correct.values()) for s in scores])),
        psnr=float(np.mean([s.psnr for s in scores])),
        ssim=float(np.mean([s.ssim for s in scores])),
        seconds=seconds,
        settings=dict(settings),
        pixel_error=float(np.mean([s.pixel_error for s in scores])),
    )


def evaluate(
    generate: GenerateFn,
    configs: Mapping[str, Mapping[str, Any]],
    scenes: Sequence[Scene] | None = None,
    seeds: Sequence[int] = (0, 1),
    warmup: bool = True,
) -> list[QualityRow]:
    """Generate every scene x seed under each named configuration and score it.

    ``warmup`` runs one image per configuration first, untimed, so that one-off costs (compilation,
    kernel selection, caches) are not billed as per-image time.
    """
    scenes = list(scenes) if scenes is not None else fixed_scenes()
    pairs = [(scene, seed) for seed in seeds for scene in scenes]
    prompts = [scene.prompt() for scene, _ in pairs]
    seed_list = [seed for _, seed in pairs]
    rows = []
    for name, config in configs.items():
        if warmup:
            generate(prompts[:1], seed_list[:1], **config)
        start = time.perf_counter()
        images = generate(prompts, seed_list, **config)
        seconds = time.perf_counter() - start
        if len(images) != len(pairs):
            raise ValueError(f"{name}: generate returned {len(images)} images for {len(pairs)} requests")
        scores = [score_image(img, scene) for img, (scene, _) in zip(images, pairs, strict=True)]
        rows.append(summarise(name, scores, seconds, config))
    return rows


def markdown_table(rows: Sequence[QualityRow]) -> str:
    """The rows as a GitHub markdown table (accuracies in %, PSNR in dB, time per image in ms)."""
    head = ["configuration", "images", *ATTRIBUTES, "overall", "all 5 right", "PSNR dB", "SSIM", "ms/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.config, str(r.images), *(f"{100 * r.accuracy[a]:.1f}" for a in ATTRIBUTES)]
        cells += [f"**{100 * r.overall:.1f}**", f"{100 * r.exact:.1f}", f"{r.psnr:.2f}", f"{r.ssim:.3f}"]
        cells.append(f"{1000 * r.seconds_per_image:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pipeline_generator(pipe: Any, batch_size: int = 32, **call: Any) -> GenerateFn:
    """A ``generate`` bound to a plain diffusers pipeline (the reference stack); ``call`` holds fixed
    pipeline arguments (a FluxPipeline's ``max_sequence_length``, say).

    Config keys: ``steps`` (20), ``guidance`` (the model's default), ``sigmas`` (a custom schedule,
    final 0 included, e.g. from an AYS offer). One torch.Generator per image, as the engine does,
    so an image is the same alone or inside a batch.
    """
    import torch

    def generate(prompts: Sequence[str], seeds: Sequence[int], **config: Any) -> list[Image.Image]:
        steps = int(config.get("steps", 20))
        kwargs: dict[str, Any] = {**call, "guidance_scale": float(config.get("guidance", 4.0))}
        if config.get("sigmas") is not None:
            kwargs["sigmas"] = list(config["sigmas"])
        else:
            kwargs["num_inference_steps"] = steps
        out: list[Image.Image] = []
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = list(prompts[i : i + batch_size]), seeds[i : i + batch_size]
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk_seeds]
            result = pipe(chunk, generator=gens, output_type="pil", **kwargs)
            out.extend(result.images)
        return out

    return generate


ENGINE_KEYS = ("steps", "guidance", "sampler", "schedule", "wrappers")


def engine_generator(engine: Any, model: str = "") -> GenerateFn:
    """Bind the harness to the engine's ``model`` ("" for its default): one job per (prompt, seed),
    ``batch_size`` jobs per call."""
    from diffstack.engine import GenerationJob, GenerationRequest

    def generate(prompts: Sequence[str], seeds: Sequence[int], **config: Any) -> list[Image.Image]:
        fields = {k: v for k, v in config.items() if k in ENGINE_KEYS}
        batch = int(config.get("batch_size", 16))
        images: list[Image.Image] = []
        for i in range(0, len(prompts), batch):
            jobs = [
                GenerationJob(
                    engine.prepare(GenerationRequest(prompt=p, seeds=(int(s),), model=model, **fields))
                )
                for p, s in zip(prompts[i : i + batch], seeds[i : i + batch], strict=True)
            ]
            for result in engine.run(jobs):
                if isinstance(result, Exception):
                    raise result
                images.append(result.images[0].image)
        return images

    return generate
