"""The context-parallel offers: their probes' reasons, and Ulysses over 2 CPU ranks (gloo) against one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest
import torch

import diffstack.hookspecs
import diffstack_context_parallel
from diffstack.types import CompileOffer, DenoiserKind, Family, ModelInfo

HERE = Path(__file__).parent


def model_info(kind: DenoiserKind = DenoiserKind.TRANSFORMER, **options: object) -> ModelInfo:
    return ModelInfo(
        name="tiny",
        family=Family.FLUX if kind is DenoiserKind.TRANSFORMER else Family.SD1,
        denoiser_kind=kind,
        device="cpu",
        dtype=torch.float32,
        options={"context_parallel": options},
    )


def offers(model: ModelInfo) -> dict[str, CompileOffer]:
    pm = pluggy.PluginManager("diffstack")
    pm.add_hookspecs(diffstack.hookspecs)
    pm.register(diffstack_context_parallel)
    (found,) = pm.hook.compile_model(model=model)
    return {offer.name: offer for offer in found}


def test_it_offers_ulysses_and_ring_as_ways_to_execute_the_denoiser() -> None:
    found = offers(model_info())
    assert set(found) == {"context_parallel_ulysses", "context_parallel_ring"}
    assert all(offer.priority < 0 for offer in found.values())  # a measured tie goes to one GPU


def test_without_a_process_group_it_declines_and_says_how_to_start_one() -> None:
    model = model_info()
    answer = offers(model)["context_parallel_ulysses"].probe(model)
    assert not answer.ok
    assert "--context-parallel" in answer.reason


def test_a_unet_is_declined_before_anything_else() -> None:
    model = model_info(DenoiserKind.UNET)
    answer = offers(model)["context_parallel_ulysses"].probe(model)
    assert not answer.ok and "transformer" in answer.reason


def test_modes_leave_out_the_offers_not_named() -> None:
    model = model_info(modes="ulysses")
    answer = offers(model)["context_parallel_ring"].probe(model)
    assert not answer.ok and "modes" in answer.reason


def test_bad_options_are_a_reason_not_a_crash() -> None:
    model = model_info(compile="yes please")
    answer = offers(model)["context_parallel_ulysses"].probe(model)
    assert not answer.ok and "context_parallel" in answer.reason


@pytest.mark.slow
def test_ulysses_over_two_cpu_ranks_matches_one_rank_and_leaves_the_model_alone() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    finished = subprocess.run(
        [*command, str(HERE / "two_ranks.py")],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    answers = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert finished.returncode == 0 and len(answers) == 2, finished.stderr[-3000:]
    for answer in answers:
        assert answer["error"] < 1e-5, answer
        assert answer["original_untouched"] and answer["weights_shared"], answer
        assert "ulysses degree 2" in answer["notes"]
