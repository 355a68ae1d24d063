"""The benchmark's FLUX pipeline hands its transformer prompt embeddings of the width it reads.

The e2e-flux stage once built a T5 stand-in 32 wide for a transformer whose ``context_embedder``
reads 4096, and failed on the H200 at its first generation; this checks the stand-in on the CPU."""

from __future__ import annotations

import torch

from bench.models import T5_VOCAB, config, tiny_t5
from diffstack.testing import word_tokenizer


def test_the_tiny_t5_is_as_wide_as_the_flux_transformer_reads() -> None:
    tokenizer = word_tokenizer(vocab_size=T5_VOCAB, max_length=16)
    tokens = tokenizer(["a red circle on blue"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        embeddings = tiny_t5("cpu", torch.float32)(tokens.input_ids).last_hidden_state
    assert embeddings.shape == (1, 16, config("flux_transformer.json")["joint_attention_dim"])
    assert torch.isfinite(embeddings).all()
