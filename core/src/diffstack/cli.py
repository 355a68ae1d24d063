"""The ``diffstack`` command: generate images, list plugins, show the composed stack, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstack.config import Settings, load_settings
from diffstack.errors import DiffstackError, FieldViolation, InvalidRequest
from diffstack.logs import configure_logging

if TYPE_CHECKING:
    from PIL import Image


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = load_settings(args.config, **_overrides(args))
    configure_logging(settings.server.log_format)
    try:
        return int(args.command(args, settings) or 0)
    except InvalidRequest as exc:
        for violation in exc.violations:
            print(f"error: {violation.field}: {violation.description}", file=sys.stderr)
        return 2
    except DiffstackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstack", description=__doc__)
    parser.add_argument("--config", type=Path, help="a TOML settings file")
    parser.add_argument("--models-dir", type=Path, help="folder that client-given model names resolve in")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: auto)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images from a prompt into PNG files")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    generate.add_argument("--negative", default="", help="negative prompt")
    generate.add_argument(
        "--model", default="", help="model name (default: the configured or embedded model)"
    )
    generate.add_argument("--width", type=int, default=0)
    generate.add_argument("--height", type=int, default=0)
    generate.add_argument("--steps", type=int, default=0)
    generate.add_argument("--guidance", type=float)
    generate.add_argument("--sampler", default="")
    generate.add_argument("--schedule", default="auto")
    generate.add_argument("--seed", type=int, action="append", default=[], help="repeat for several images")
    generate.add_argument("-n", "--num-images", type=int, default=1)
    generate.add_argument("--init-image", type=Path, help="img2img: start from this picture")
    generate.add_argument("--strength", type=float, default=0.75)
    generate.add_argument(
        "--wrapper",
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="enable a denoiser wrapper",
    )
    generate.set_defaults(command=_generate)

    plugins = commands.add_parser("plugins", help="list installed plugins and their load status")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(command=_plugins)

    stack = commands.add_parser("stack", help="compose and show the stack for a model on this machine")
    stack.add_argument("--model", default="")
    stack.add_argument("--json", action="store_true")
    stack.set_defaults(command=_stack)

    quality = commands.add_parser(
        "quality", help="score one configuration against the synthetic world's ground truth"
    )
    quality.add_argument("--scenes", type=int, default=48, help="how many fixed prompts")
    quality.add_argument("--seeds", default="0,1", help="comma-separated seeds per prompt")
    quality.add_argument("--steps", type=int, default=0)
    quality.add_argument("--guidance", type=float)
    quality.add_argument("--sampler", default="")
    quality.add_argument("--schedule", default="auto")
    quality.add_argument("--wrapper", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    quality.add_argument("--batch-size", type=int, default=16)
    quality.set_defaults(command=_quality)

    serve = commands.add_parser("serve", help="run the gRPC server (needs diffstack-server)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(command=_serve)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    engine = {k: v for k, v in (("models_dir", args.models_dir), ("device", args.device)) if v is not None}
    server = {k: getattr(args, k, None) for k in ("host", "port") if getattr(args, k, None) is not None}
    return {"engine": engine, "server": server}


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from diffstack.engine import Engine, GenerationJob, GenerationRequest, StepEvent

    engine = Engine.start(settings)
    request = engine.prepare(
        GenerationRequest(
            prompt=args.prompt,
            negative_prompt=args.negative,
            model=args.model,
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            schedule=args.schedule,
            seeds=tuple(args.seed),
            num_images=args.num_images,
            init_image=_open_image(args.init_image) if args.init_image else None,
            strength=args.strength,
            wrappers=dict(_wrapper(spec) for spec in args.wrapper),
        )
    )
    with tqdm(total=request.steps, unit="step", desc="generating") as bar:

        def advance(event: StepEvent) -> None:
            bar.update(event.step - bar.n)

        (result,) = engine.run([GenerationJob(request, on_step=advance)])
    if isinstance(result, DiffstackError):
        raise result
    for index, generated in enumerate(result.images):
        path = _numbered(args.output, index, len(result.images))
        path.parent.mkdir(parents=True, exist_ok=True)
        generated.image.save(path)
        print(f"{path}  seed={generated.seed}")
    for note in engine.report(request.model).notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _open_image(path: Path) -> Image.Image:
    """The init image, or an InvalidRequest naming the flag when it cannot be read as a picture."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidRequest(FieldViolation("init_image", f"cannot read {path}: {exc}")) from exc


def _wrapper(spec: str) -> tuple[str, dict[str, Any]]:
    """``deepcache:interval=3,branch=0`` → ("deepcache", {"interval": 3, "branch": 0})."""
    name, _, options = spec.partition(":")
    parsed: dict[str, Any] = {}
    for pair in filter(None, options.split(",")):
        key, _, value = pair.partition("=")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return name, parsed


def _numbered(path: Path, index: int, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


def _plugins(args: argparse.Namespace, settings: Settings) -> int:
    from diffstack.plugins import load_plugins
    from diffstack.render import plugins_table, to_jsonable

    records = load_plugins(settings.plugins).records
    print(json.dumps(to_jsonable(records), indent=2) if args.json else plugins_table(records))
    return 0


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from diffstack.engine import Engine
    from diffstack.plugins import load_plugins
    from diffstack.render import report_text, to_jsonable

    engine = Engine(settings, load_plugins(settings.plugins))
    report = engine.report(args.model)
    print(json.dumps(to_jsonable(report), indent=2) if args.json else report_text(report))
    return 0


def _quality(args: argparse.Namespace, settings: Settings) -> int:
    """Only meaningful for a model trained on the synthetic world, like the embedded default."""
    from diffstack.engine import Engine
    from diffstack.synthetic.quality import engine_generator, evaluate, fixed_scenes, markdown_table

    config: dict[str, Any] = {"schedule": args.schedule, "batch_size": args.batch_size}
    for key in ("steps", "guidance", "sampler"):
        if getattr(args, key):
            config[key] = getattr(args, key)
    if args.wrapper:
        config["wrappers"] = dict(_wrapper(spec) for spec in args.wrapper)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    label = " ".join(f"{k}={v}" for k, v in config.items() if k != "batch_size") or "defaults"
    rows = evaluate(
        engine_generator(Engine.start(settings)),
        {label: config},
        scenes=fixed_scenes(args.scenes),
        seeds=seeds,
    )
    print(markdown_table(rows))
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from diffstack_server import serve
    except ImportError:
        print("error: the server is not installed: pip install -e ./server", file=sys.stderr)
        return 1
    return int(serve(settings) or 0)
