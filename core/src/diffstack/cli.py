"""The ``diffstack`` command: generate images, list plugins, show the composed stack, score quality.

Other distributions add commands through the ``diffstack.commands`` entry-point group (the server adds
``serve``): each entry point names a ``register_commands(commands)`` function that adds subparsers, so
the core never imports them. Flags that set a setting are declared once as :class:`SettingFlag` and
read back by :func:`settings_from_args`, the one flag → settings mapping every entry point shares.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from diffstack.config import Settings, load_settings
from diffstack.errors import DiffstackError, FieldViolation, InvalidRequest
from diffstack.logs import configure_logging

if TYPE_CHECKING:
    from PIL import Image

COMMANDS_GROUP = "diffstack.commands"
"""Entry points here name ``register_commands(commands: Subcommands) -> None``."""

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers()`` returns; a ``register_commands`` function adds its parsers to it."""
Command = Callable[[argparse.Namespace, Settings], int]
"""What a subparser stores as ``command``: it runs with the parsed flags and the loaded settings."""


@dataclass(frozen=True)
class SettingFlag:
    """A flag that sets ``section.field`` of :class:`~diffstack.config.Settings` when given."""

    flag: str
    section: str
    field: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return f"{self.section}.{self.field}"


COMMON_FLAGS = (
    SettingFlag("--models-dir", "engine", "models_dir", "folder that model names resolve in", Path),
    SettingFlag("--device", "engine", "device", "cpu, cuda, cuda:1, ... (default: auto)"),
)
"""Setting flags of every command, the server's included."""


def add_setting_flags(parser: argparse.ArgumentParser, flags: Sequence[SettingFlag]) -> None:
    """Add ``--config`` and ``flags``; a flag not given leaves its setting to the file or environment."""
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="a TOML settings file")
    for flag in flags:
        parser.add_argument(
            flag.flag,
            dest=flag.dest,
            type=flag.type,
            choices=flag.choices,
            metavar=None if flag.choices else flag.field.upper(),
            default=argparse.SUPPRESS,
            help=flag.help,
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from ``--config``, the environment, then every :class:`SettingFlag` that was given."""
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, dot, field = dest.partition(".")
        if dot:
            overrides.setdefault(section, {})[field] = value
    return load_settings(getattr(args, "config", None), **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffstack", description=__doc__)
    add_setting_flags(parser, COMMON_FLAGS)
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

    _register_installed_commands(commands)
    return parser


def _register_installed_commands(commands: Subcommands) -> None:
    """Let installed distributions add their commands; one that fails is reported and skipped."""
    for entry_point in entry_points(group=COMMANDS_GROUP):
        try:
            entry_point.load()(commands)
        except Exception as exc:
            print(
                f"warning: commands from {entry_point.value} are unavailable: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )


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
