"""In JSON mode the log stream is JSON only: library logging, warnings and progress bars included."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    from pathlib import Path

    from diffstack.logs import configure_logging

    configure_logging("json")  # before transformers and diffusers are imported, as the server does

    import structlog
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from diffstack.engine.loading import load_pipeline
    from diffstack.testing import save_tiny_model
    from diffstack.types import Family

    structlog.get_logger("diffstack.test").info("ours", answer=42)
    transformers_logging.get_logger("transformers.models.clip").warning("from transformers")
    diffusers_logging.get_logger("diffusers.pipelines").warning("from diffusers")
    logging.getLogger("accelerate.utils").warning("from accelerate")
    warnings.warn("a library warning", UserWarning)
    save_tiny_model(Family.SD1, Path(sys.argv[1]) / "tiny")
    load_pipeline(Path(sys.argv[1]) / "tiny", Family.SD1, "cpu", __import__("torch").float32)
    """
)


@pytest.mark.slow
def test_json_mode_writes_json_lines_only(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"a plain-text line in the JSON stream: {line!r}") from None
    events = {(r.get("logger", ""), r["event"].splitlines()[0]) for r in records}
    assert ("", "ours") in events
    assert ("transformers.models.clip", "from transformers") in events
    assert ("diffusers.pipelines", "from diffusers") in events
    assert ("accelerate.utils", "from accelerate") in events
    assert any(logger == "py.warnings" and "a library warning" in event for logger, event in events)
