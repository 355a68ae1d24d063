"""One process's life with the torch_compile offer: build, first call, report (run by the tests).

Usage: python compile_tiny_unet.py CACHE_DIR. Prints one JSON line. Kept out of the pytest process so
that inductor's process-wide caches start empty, as after a real restart.
"""

from __future__ import annotations

import json
import sys

import pluggy
import torch
from torch._dynamo.utils import counters

import diffstack.hookspecs
import diffstack_torch_compile
from diffstack.testing import tiny_unet
from diffstack.types import DenoiserKind, Family, ModelInfo


def main(cache_dir: str) -> None:
    model = ModelInfo(
        name="tiny-sd1",
        family=Family.SD1,
        denoiser_kind=DenoiserKind.UNET,
        device="cpu",
        dtype=torch.float32,
        options={"torch_compile": {"cache_dir": cache_dir, "allow_cpu": True}},
    )
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_torch_compile)
    answers = pm.hook.compile_model(model=model)
    [offer] = [offer for offers in answers for offer in offers if offer.name == "torch_compile"]
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 10]),
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=generator),
    }
    with torch.inference_mode():
        eager = unet(**inputs, return_dict=False)[0]
        built = offer.build(unet, model)
        compiled = built.value
        output = compiled(**inputs, return_dict=False)[0]
    error = float((output - eager).norm() / eager.norm())
    print(
        json.dumps(
            {
                "probe": offer.probe(model).reason,
                "error": error,
                "compile_seconds": compiled.diffstack_compile_seconds,
                "notes": built.notes,
                "hits": counters["inductor"]["fxgraph_cache_hit"],
                "misses": counters["inductor"]["fxgraph_cache_miss"],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
