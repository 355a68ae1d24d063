"""The synthetic world of the embedded default model, and the harness that scores generations of it.

Kept free of torch/diffusers imports (numpy and Pillow only) so that the renderer and the analyser
load anywhere, including the training script on a bare GPU machine.
"""

from diffstack.synthetic.analysis import Reading, analyse
from diffstack.synthetic.quality import (
    QualityRow,
    evaluate,
    fixed_scenes,
    markdown_table,
    psnr,
    score_image,
    ssim,
)
from diffstack.synthetic.scenes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    OPTIONAL_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    SIZES,
    PartialScene,
    Scene,
    all_scenes,
    parse_prompt,
    render,
    render_batch,
    render_prompt,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "IMAGE_SIZE",
    "OPTIONAL_ATTRIBUTES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "PartialScene",
    "QualityRow",
    "Reading",
    "Scene",
    "all_scenes",
    "analyse",
    "evaluate",
    "fixed_scenes",
    "markdown_table",
    "parse_prompt",
    "psnr",
    "render",
    "render_batch",
    "render_prompt",
    "score_image",
    "ssim",
]
