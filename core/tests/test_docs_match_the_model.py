"""The docs say what the code does: the grammar is the model's, example prompts are drawable, and
each plugin guide shows the template's plugin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffstack.hookspecs import HOOK_NAMES
from diffstack.synthetic.scenes import grammar, is_trained_prompt
from diffstack.template import plugin_source

ROOT = Path(__file__).resolve().parents[2]
GUIDE_NAMES = {
    "select_attention": "my_attention",
    "build_sigmas": "my_schedule",
    "select_sampler": "my_sampler",
    "encode_prompt": "my_encoder",
    "wrap_denoiser": "my_wrapper",
    "compile_model": "my_compile",
}
PROMPT_SOURCES = (
    "README.md",
    "clients/python/README.md",
    "clients/node/README.md",
    "clients/node/src/demo.js",
    "clients/node/src/client.js",
    "clients/python/src/diffstack_client/__init__.py",
    "clients/python/src/diffstack_client/client.py",
    "clients/python/src/diffstack_client/aio.py",
    "scripts/demo.sh",
    "docs/plugins/README.md",
)


def test_the_readme_states_the_grammar_the_model_was_trained_on() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- grammar -->\n```\n(.*?)\n```\n<!-- /grammar -->", readme, re.S)
    assert block is not None, "README.md lost its grammar block"
    assert block.group(1) == grammar()


def test_the_grammar_check_is_word_for_word() -> None:
    assert is_trained_prompt("a small red circle at the top left on a blue background")
    assert is_trained_prompt("a purple square in the center")
    assert not is_trained_prompt("a red circle at the center")  # the wording the README once showed
    assert not is_trained_prompt("a lighthouse on a cliff at dusk")
    assert not is_trained_prompt("a red circle on a red background")


@pytest.mark.parametrize("source", PROMPT_SOURCES)
def test_example_prompts_are_ones_the_model_can_draw(source: str) -> None:
    text = (ROOT / source).read_text()
    prompts = [" ".join(p.split()) for p in re.findall(r"[\"'](an? [a-z][a-z ,\n]*?)[\"']", text)]
    examples = [p for p in prompts if len(p.split()) >= 3]
    assert examples, f"{source} shows no example prompt"
    assert [p for p in examples if not is_trained_prompt(p)] == []


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_each_plugin_guide_shows_the_templates_plugin(hook: str) -> None:
    guide = (ROOT / "docs" / "plugins" / f"{hook}.md").read_text()
    assert f"```python\n{plugin_source(GUIDE_NAMES[hook], hook)}```" in guide
    assert "## How the host checks it" in guide
    assert f"[{hook}.md]({hook}.md)" in (ROOT / "docs" / "plugins" / "README.md").read_text()
