"""Run by test_context_parallel_plugin.py under torchrun (2 CPU ranks, gloo): prints one JSON line."""

import json
import os

import torch
import torch.distributed as dist

from diffstack.testing import tiny_flux_transformer
from diffstack_context_parallel.parallel import parallel_denoiser

dist.init_process_group("gloo")
torch.manual_seed(0)
model = tiny_flux_transformer().eval()
g = torch.Generator().manual_seed(1)
inputs = {
    "hidden_states": torch.randn(2, 64, 16, generator=g),
    "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
    "pooled_projections": torch.randn(2, 32, generator=g),
    "timestep": torch.tensor([0.5, 0.5]),
    "guidance": torch.tensor([3.5, 3.5]),
    "img_ids": torch.randn(64, 3, generator=g),
    "txt_ids": torch.zeros(8, 3),
    "return_dict": False,
}
with torch.inference_mode():
    one_rank = model(**inputs)[0]
    built = parallel_denoiser(model, "ulysses", compile_it=False)
    split = built.value(**inputs)[0]
    after = model(**inputs)[0]
    shared = all(a is b for a, b in zip(model.parameters(), built.value.parameters(), strict=True))
answer = {
    "rank": dist.get_rank(),
    "error": float((split - one_rank).norm() / one_rank.norm()),
    "original_untouched": bool(torch.equal(after, one_rank)),
    "weights_shared": shared,
    "notes": list(built.notes),
}
# One write per rank (a line under PIPE_BUF is atomic): print's separate text and newline writes let
# the two ranks' lines run together on the shared pipe.
os.write(1, (json.dumps(answer) + "\n").encode())
dist.destroy_process_group()
