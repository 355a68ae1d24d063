"""Write QUALITY.md: what each optimization of the stack costs in quality, on the embedded default model.

    python bench/quality_report.py --out QUALITY.md

Every configuration runs through the real engine (plugins loaded and composed as the server does),
bound to the harness's ``generate(prompts, seeds, **config)``; two reference rows run a plain
diffusers pipeline instead, one of them with diffusers' classic (non-SDPA) attention, so the table
also shows that the engine reproduces diffusers and what the attention implementation changes.
`diffstack quality` scores one configuration; this script runs the whole table behind QUALITY.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

from diffstack.synthetic.quality import (  # noqa: E402
    QualityRow,
    engine_generator,
    evaluate,
    fixed_scenes,
    markdown_table,
    pipeline_generator,
)


def engine_configs(guidance: float) -> dict[str, dict[str, Any]]:
    euler = {"sampler": "euler", "guidance": guidance}
    return {
        "euler 20, default schedule (reference)": {**euler, "steps": 20, "schedule": "default"},
        "euler 10, default schedule": {**euler, "steps": 10, "schedule": "default"},
        "euler 10, AYS": {**euler, "steps": 10, "schedule": "ays"},
        "euler 20, AYS (interpolated)": {**euler, "steps": 20, "schedule": "ays"},
        "euler 5, default schedule": {**euler, "steps": 5, "schedule": "default"},
        "euler 5, AYS (interpolated)": {**euler, "steps": 5, "schedule": "ays"},
        "euler 20, karras": {**euler, "steps": 20, "schedule": "karras"},
        "euler 20, DeepCache interval 2": {**euler, "steps": 20, "schedule": "default",
                                           "wrappers": {"deepcache": {"interval": 2}}},
        "euler 20, DeepCache interval 3": {**euler, "steps": 20, "schedule": "default",
                                           "wrappers": {"deepcache": {"interval": 3}}},
        "euler 20, DeepCache interval 5": {**euler, "steps": 20, "schedule": "default",
                                           "wrappers": {"deepcache": {"interval": 5}}},
        "euler 10, DeepCache interval 2": {**euler, "steps": 10, "schedule": "default",
                                           "wrappers": {"deepcache": {"interval": 2}}},
        "euler 10, DeepCache interval 3": {**euler, "steps": 10, "schedule": "default",
                                           "wrappers": {"deepcache": {"interval": 3}}},
        "dpmpp_2m 10, default schedule": {"sampler": "dpmpp_2m", "guidance": guidance, "steps": 10,
                                          "schedule": "default"},
        "euler 20, guidance 1 (no CFG: half the UNet work)": {**euler, "guidance": 1.0, "steps": 20,
                                                              "schedule": "default"},
        "euler 20, one image per call (batch 1)": {**euler, "steps": 20, "schedule": "default",
                                                   "batch_size": 1},
    }  # fmt: skip


def diffusers_rows(model_dir: Path, guidance: float, scenes: Any, seeds: Sequence[int]) -> list[QualityRow]:
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    generate = pipeline_generator(pipe, batch_size=16)
    config = {"steps": 20, "guidance": guidance}
    rows = evaluate(generate, {"plain diffusers, euler 20, SDPA": config}, scenes=scenes, seeds=seeds)
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    rows += evaluate(
        generate, {"plain diffusers, euler 20, classic attention": config}, scenes=scenes, seeds=seeds
    )
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    alone = pipeline_generator(pipe, batch_size=1)
    rows += evaluate(alone, {"plain diffusers, euler 20, SDPA, batch 1": config}, scenes=scenes, seeds=seeds)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "QUALITY.md"))
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching rows")
    args = p.parse_args(argv)
    from diffstack.config import Settings
    from diffstack.engine.engine import Engine
    from diffstack.engine.loading import DEFAULT_MODEL_DIR

    torch.manual_seed(0)
    scenes, seeds = fixed_scenes(args.scenes), tuple(int(s) for s in args.seeds.split(","))
    engine = Engine.start(Settings())
    model = engine.model()
    guidance = float(model.default_guidance)
    configs = engine_configs(guidance)
    only = [s for s in args.only.split(",") if s]
    if only:
        configs = {k: v for k, v in configs.items() if any(s in k for s in only)}
    t0 = time.time()
    rows = evaluate(engine_generator(engine), configs, scenes=scenes, seeds=seeds)
    if not only or any("diffusers" in s for s in only):
        rows += diffusers_rows(DEFAULT_MODEL_DIR, guidance, scenes, seeds)
    report = engine.report()
    write_report(Path(args.out), render(args, rows, report, guidance, time.time() - t0))
    print(markdown_table(rows))
    return 0


START, END = "<!-- generated by bench/quality_report.py: start -->", "<!-- generated: end -->"


def write_report(path: Path, generated: str) -> None:
    """Replace only the generated block of an existing report, keeping the hand-written reading."""
    block = f"{START}\n{generated}{END}\n"
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = block + text
    path.write_text(text)


def render(
    args: argparse.Namespace, rows: list[QualityRow], report: Any, guidance: float, wall: float
) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()  # fmt: skip
    import diffusers

    offers = {s.slot: sorted({c.split(": ")[-1] for c in s.chosen}) for s in report.slots}
    stack = "; ".join(f"{slot}: {', '.join(names) or 'none'}" for slot, names in offers.items())
    return f"""# QUALITY: what each optimization costs in picture quality

Made by `python bench/quality_report.py --scenes {args.scenes} --seeds {args.seeds}` (commit {commit}):
the quality harness (`diffstack.synthetic.quality`) over {args.scenes} fixed prompts x seeds
{args.seeds}, every image read back by the deterministic analyser and compared with the exact
rendering of its prompt. Model: the embedded default `synthetic-shapes-64` (guidance {guidance:g}).

Where it ran: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__},
diffusers {diffusers.__version__}, float32; {wall / 60:.0f} min in all. The machine was shared with
other jobs, so the time column is indicative only (compare rows, not absolute numbers).
Engine stack chosen on this machine: {stack}.

{markdown_table(rows)}
"""


if __name__ == "__main__":
    sys.exit(main())
