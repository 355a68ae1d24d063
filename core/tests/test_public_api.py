"""The plugin API: ``from diffstack import ...`` gives a plugin everything, cheaply."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import diffstack


def test_every_public_name_resolves() -> None:
    missing = [name for name in diffstack.__all__ if not hasattr(diffstack, name)]
    assert not missing
    assert {"hookimpl", "AttentionOffer", "SigmasOffer", "EncoderOffer", "DenoiserWrapperOffer"} <= set(
        diffstack.__all__
    )
    assert {"CompileOffer", "Availability", "ModelInfo", "__version__"} <= set(diffstack.__all__)


def test_the_version_comes_from_the_package_metadata() -> None:
    assert diffstack.__version__ == version("diffstack")


def test_importing_the_api_loads_neither_torch_nor_the_engine() -> None:
    """Plugins are imported at start-up to read their hooks; that must stay cheap."""
    script = "import sys, json, diffstack; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    loaded = set(json.loads(done.stdout))
    assert "diffstack.types" in loaded
    heavy = {"torch", "diffusers", "transformers", "diffstack.engine", "diffstack.compose"}
    assert not heavy & loaded
