"""Score an exported synthetic-shapes-flux beside a random model of its config; rewrite its card.

    python train/score_flux_model.py --model core/src/diffstack/models/synthetic-shapes-flux \\
        --stats bench/results/2026-12-01-h200-flux-train-stats.json --device cpu \\
        --gpu-quality bench/results/2026-12-01-h200-s20-quality.json

For a run whose own --eval did not finish (the GPU call's timeout cut it): the trainer's evaluation
(flux_model_card.evaluate_models, a random model from train_flux_model.export_random, both in this
run) on any device, with the training facts read from the run's stats JSON. --gpu-quality adds the
synthetic-shapes-flux rows of a `bench/run.py --stages quality` results JSON to the card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flux_model_card  # noqa: E402
import train_flux_model  # noqa: E402

GPU_COLUMNS = (
    "| configuration | images | accuracy % | all 5 right % | pixel error | PSNR dB | ms/image | cache hits |"
)


def gpu_section(results: Path) -> str:
    """The model's eager rows of a quality stage's results, as a card section naming where they ran."""
    data = json.loads(results.read_text())
    meta, stage = data["meta"], data["stages"]["quality"]
    rows = [r for r in stage["rows"] if r["model"] == flux_model_card.NAME and r["engine"] == "eager"]
    lines = [GPU_COLUMNS, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hits = f"{r['cache_hit_rate']:.0%}" if "cache_hit_rate" in r else ""
        lines.append(
            f"| {r['variant']} | {r['images']} | **{r['accuracy']:.1f}** | {r['all_right']:.1f} | "
            f"{r['pixel_error']:.2f} | {r['psnr']:.2f} | {r['ms_per_image']:.1f} | {hits} |"
        )
    seeds = ", ".join(str(s) for s in stage["seeds"])
    return (
        f"## Quality on the GPU ({meta['card']}, the `quality` stage of {meta['date_utc'][:10]}, "
        f"commit {meta['git_commit']})\n"
        f"`{meta['command'].split('python3 ', 1)[-1]}`: `diffstack quality` through the engine "
        f"(torch {meta['torch']}, diffusers {meta['diffusers']}), {stage['scenes']} fixed prompts x "
        f"seeds {seeds} = {rows[0]['images'] if rows else 0} images a row, eager engine, bf16. "
        "flow_arcsine is our flow-matching schedule (plugins/schedules); the first-block cache's hit "
        "rate is the share of transformer passes it skipped. ms/image includes the text encoders and "
        "the VAE decode at batch 16.\n\n" + "\n".join(lines) + "\n\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the exported model folder (its card is rewritten)")
    p.add_argument("--stats", required=True, help="the training run's stats JSON (train_flux_model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-scenes", type=int, default=96)
    p.add_argument("--eval-seeds", default="0,1,2")
    p.add_argument("--eval-steps", default="20,12,8", help="flow-Euler step counts scored")
    p.add_argument("--gpu-quality", default=None, help="a quality stage's results JSON to quote")
    p.add_argument("--note", default="", help="a paragraph about the run, put before the quality sections")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.model)
    stats: dict[str, Any] = json.loads(Path(args.stats).read_text())
    run_args = {**stats["args"], "eval_scenes": args.eval_scenes, "eval_seeds": args.eval_seeds}
    facts = flux_model_card.Facts(
        counts=stats["counts"], state=stats["state"], args=run_args, device=stats["device"],
        torch=stats["torch"], time_shift=stats["time_shift"], eval_device=args.device,
    )  # fmt: skip
    t0 = time.time()
    random_dir = out.with_name(out.name + "-random")
    tokenizer = str(ROOT / "core/src/diffstack/default_model/tokenizer")  # the run's, on this machine
    scoring = argparse.Namespace(**{**run_args, **vars(args), "tokenizer": tokenizer})
    train_flux_model.export_random(
        random_dir, scoring, facts.state["shift_factor"], facts.state["scaling_factor"]
    )
    try:
        rows, random_rows = flux_model_card.evaluate_models(out, random_dir, scoring)
    finally:
        shutil.rmtree(random_dir, ignore_errors=True)
    facts.eval_s = time.time() - t0
    print(f"evaluation took {facts.eval_s:.1f} s", flush=True)
    note = f"{args.note.strip()}\n\n" if args.note.strip() else ""
    facts.extra = note + (gpu_section(Path(args.gpu_quality)) if args.gpu_quality else "")
    flux_model_card.finish(out, facts, rows, random_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
