"""CFG++ against Euler with ordinary CFG at low step counts, on the trained default model (CPU).

Run from the repository root: ``.venv/bin/python plugins/cfgpp/quality.py --scenes 48 --seeds 0,1``.
Every configuration uses the pipeline's own encoder, seeds, Euler sigmas and VAE; the rows come from
the project's quality harness (``diffstack.synthetic.quality``), printed as a markdown table.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from diffusers import StableDiffusionPipeline

from diffstack.engine.loading import DEFAULT_MODEL_DIR
from diffstack.synthetic.quality import evaluate, fixed_scenes, markdown_table, pipeline_generator
from diffstack_cfgpp.pipeline import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", default="8,12")
    parser.add_argument("--scales", default="0.2,0.4,0.6")
    args = parser.parse_args()
    scenes = fixed_scenes(args.scenes)
    seeds = [int(s) for s in args.seeds.split(",")]
    pipe = StableDiffusionPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def cfgpp(prompts: Any, seeds: Any, **config: Any) -> Any:
        run = functools.partial(generate, pipe, steps=config["steps"], scale=config["scale"])
        return [image for i in range(0, len(prompts), 16) for image in
                run(prompts[i : i + 16], seeds[i : i + 16], sampler=config["sampler"])]  # fmt: skip

    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        baseline = {f"euler {steps}, CFG 4 (ordinary)": {"steps": steps, "guidance": 4.0}}
        rows += evaluate(pipeline_generator(pipe, batch_size=16), baseline, scenes=scenes, seeds=seeds)
        configs = {
            f"{sampler} {steps}, λ {scale}": {"steps": steps, "scale": float(scale), "sampler": sampler}
            for sampler in ("euler_cfgpp", "dpmpp_2m_cfgpp")
            for scale in args.scales.split(",")
        }
        rows += evaluate(cfgpp, configs, scenes=scenes, seeds=seeds)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
