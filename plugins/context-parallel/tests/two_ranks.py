"""Run by test_context_parallel_plugin.py under torchrun (2 CPU ranks, gloo): prints one JSON line."""

import json

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel

from diffstack_context_parallel.parallel import parallel_denoiser

dist.init_process_group("gloo")
torch.manual_seed(0)
model = FluxTransformer2DModel(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 4, 8),
).eval()
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
print(
    json.dumps(
        {
            "rank": dist.get_rank(),
            "error": float((split - one_rank).norm() / one_rank.norm()),
            "original_untouched": bool(torch.equal(after, one_rank)),
            "weights_shared": shared,
            "notes": list(built.notes),
        }
    ),
    flush=True,
)
dist.destroy_process_group()
