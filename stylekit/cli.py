"""The `stylekit` command line: a thin shell over image.load_image → engine.stylize → image.save_image."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import click

from . import __version__
from .atomic import check_writable_folder, write_json
from .errors import StylekitError, UsageError
from .gimp_install import gimp
from .image import LOSSY_FORMATS, load_image, output_format, save_image
from .loopback import is_loopback
from .pipeline.config import FORMATS as OUTPUT_FORMATS
from .pipeline.config import FolderConfig
from .presets import add_preset, get_preset, list_presets, load_preset_file, preset_request, remove_preset
from .progress import json_lines, progress_bar, write_line
from .request import (
    BACKBONE_NAMES,
    COLOR_MODES,
    DEVICES,
    MIN_SIDE,
    OPTIMIZERS,
    POOLINGS,
    PRECISIONS,
    STYLE_SCALES,
    TARGET_ENGINES,
    StyleOptions,
    StyleRequest,
)
from .weights_cache import names_a_file


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """Parse '0.7,0.3' into floats, with an error naming the option."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of numbers",
                                 param_hint=what) from None


def _names(text: str | None) -> tuple[str, ...] | None:
    """Parse 'relu1_1,relu2_1' into a tuple of layer names."""
    return None if text is None else tuple(p.strip() for p in text.split(",") if p.strip())


def _engine_options(init_file: bool) -> Callable[[Callable], Callable]:
    """The engine flags shared by every command that runs stylize() (apply, watch, batch) or keeps
    them (presets add); --init offers a FILE only where the command can use one (init_file).
    The defaults their help names are stylekit's own: a preset brings its own, which flags override."""
    decorators = [
        click.option("--size", type=click.IntRange(min=MIN_SIDE),
                     help="Long side of the output in pixels (default: the content's, at most 512)."),
        click.option("--steps", type=click.IntRange(min=1),
                     help="Loss evaluations at full size (default 200); coarser scales get half."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS),
                     help="lbfgs (default) reaches a given quality in the fewest steps; adam takes "
                          "smaller, steadier ones."),
        click.option("--init", "init", metavar="content|noise|style" + ("|FILE" if init_file else ""),
                     help="Starting image (default: content)."),
        click.option("--content-weight", type=click.FloatRange(min=0),
                     help="How much of the content's structure the output keeps (default 1)."),
        click.option("--style-weight", type=click.FloatRange(min=0),
                     help="How strongly the style's textures take over (default 1e6)."),
        click.option("--tv-weight", type=click.FloatRange(min=0),
                     help="Smoothness: higher removes speckle, lower keeps fine grain (default 10)."),
        click.option("--content-layers", help="Comma-separated layer names, e.g. relu4_2."),
        click.option("--style-layers", help="Comma-separated, e.g. relu1_1,relu2_1,relu3_1."),
        click.option("--style-layer-weights", help="One weight per style layer, comma-separated."),
        click.option("--style-blend", help="One weight per style image, in order (those of --style where "
                                             "the command takes it, else the preset's), e.g. 0.7,0.3."),
        click.option("--style-scale", type=click.FloatRange(*STYLE_SCALES),
                     help="Size of the style's strokes: its image's long side relative to the "
                          "output's (default 1)."),
        click.option("--preserve-color", type=click.Choice(COLOR_MODES),
                     help="Keep the content's colours: luminance (the style changes brightness "
                          "only) or histogram (the style recoloured to the content first); default "
                          "none."),
        click.option("--scales", type=click.IntRange(min=1),
                     help="Coarse-to-fine scales, each half the next (default 2: half size, then full; "
                          "3 for --steps ≤ 100)."),
        click.option("--weights", metavar="auto|imagenet|random|PATH", help="Weights (default auto)."),
        click.option("--backbone", type=click.Choice(BACKBONE_NAMES), help="Network (default vgg19)."),
        click.option("--pooling", type=click.Choice(POOLINGS),
                     help="max (default) or avg, which Gatys et al. found smoother."),
        click.option("--device", type=click.Choice(DEVICES),
                     help="Where to run (default auto: CUDA, then Apple's MPS, then the CPU)."),
        click.option("--precision", type=click.Choice(PRECISIONS),
                     help="bf16-grad: fp32 losses, bf16 gradient convolutions (auto: bf16-grad on CPUs "
                          "with native bf16; else fp32, which is TF32 convolutions on CUDA)."),
        click.option("--seed", type=int, help="Seed for the noise init (default 0; random weights "
                                              "take theirs from --weights random:SEED)."),
        click.option("--targets", type=click.Choice(TARGET_ENGINES),
                     help="What computes the fixed content/style targets (default onnx; torch "
                          "on a GPU that onnxruntime cannot use)."),
        click.option("--max-memory", type=click.FloatRange(min=0, min_open=True), metavar="GIB",
                     help="Most memory a run may take, in GiB (default: what is free); a larger "
                          "run is refused at once, naming the size that fits."),
    ]

    def decorate(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return decorate


engine_options = _engine_options(init_file=False)
engine_options_with_init_file = _engine_options(init_file=True)
format_option = click.option("--format", "out_format", type=click.Choice(OUTPUT_FORMATS),
                             help="Output format (default: the input's where possible, else jpg for HEIC, "
                                  "png for the rest).")
quality_option = click.option("--quality", type=click.IntRange(1, 100), default=FolderConfig.quality,
                              show_default=True,
                              help="JPEG, WebP and AVIF quality (refused for PNG and TIFF, which are "
                                   "lossless).")


def _given(parameter: str) -> bool:
    """Whether the user gave this option, rather than it taking its default."""
    source = click.get_current_context().get_parameter_source(parameter)
    return source is not click.core.ParameterSource.DEFAULT


def _check_quality(formats: set[str]) -> None:
    """Refuse a --quality given where every output is lossless: whoever gave it expected it to matter."""
    if _given("quality") and not formats & LOSSY_FORMATS:
        raise click.UsageError("--quality is for JPEG, WebP and AVIF outputs, not "
                               f"{' and '.join(sorted(formats))} (lossless): leave it out, or write .jpg, "
                               ".webp or .avif")


def _size_rule(size: int | None, preset: str | None) -> str:
    """Why an output has its long side when --size was not given: the default rule, or the preset's."""
    from .engine import DEFAULT_LONG_SIDE  # only after stylize's import has loaded torch anyway
    if size is not None:
        return f"preset '{preset}' sets size {size}"
    return f"without --size, the photo's own, at most {DEFAULT_LONG_SIDE} px"


def ray_options(function):
    """Where stylize() runs, for the commands that can hand their images to a Ray pool (batch, watch).
    A Ray flag given without --engine ray is refused: the local engine would silently ignore it."""
    @functools.wraps(function)
    def checked(*args: object, engine_name: str, **kwargs: object) -> object:
        for name in ("ray_address", "gpus_per_task"):
            if engine_name != "ray" and _given(name):
                flag = "--" + name.replace("_", "-")
                raise click.UsageError(f"{flag} is for --engine ray only (add --engine ray, or leave "
                                       f"{flag} out)")
        return function(*args, engine_name=engine_name, **kwargs)

    decorators = [
        click.option("--engine", "engine_name", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="local: this process; ray: a Ray cluster's workers."),
        click.option("--ray-address", default="auto", show_default=True, metavar="auto|ADDRESS",
                     help="The Ray cluster to join (auto: the one `ray start` runs here, or $RAY_ADDRESS)."),
        click.option("--gpus-per-task", type=click.FloatRange(min=0),
                     help="GPUs per Ray worker (default 1 if the cluster has GPUs; 0: one worker per CPU)."),
    ]
    for decorator in reversed(decorators):
        checked = decorator(checked)
    return checked


def flag_changes(flags: dict) -> tuple[dict[str, object], str | None]:
    """The options the user gave (None = not given), parsed; returns them and an init file."""
    init = flags.pop("init", None)
    init_file = None
    if init is not None and init not in ("content", "noise", "style"):
        init_file, init = init, "content"
    changes = {k: v for k, v in flags.items() if v is not None}
    for key in ("content_layers", "style_layers"):
        if key in changes:
            changes[key] = _names(changes[key])
    for key in ("style_layer_weights", "style_blend"):
        if key in changes:
            changes[key] = _floats(changes[key], "--" + key.replace("_", "-"))
    if init is not None:
        changes["init"] = init
    return changes, init_file


def _same_path(a: Path, b: str) -> bool:
    """Whether two paths name one file, existing (links included) or about to be written."""
    if a.exists() and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _check_writable(target: Path, what: str, inputs: list[str]) -> None:
    """Refuse a file to write that would replace an input, or whose folder is missing or read-only,
    before any work: finding out after minutes of optimisation would waste them."""
    if not target.parent.is_dir():
        problem = "is not a folder" if target.parent.exists() else "does not exist"
        raise StylekitError(f"{what} folder '{target.parent}' {problem}")
    for source in inputs:
        if _same_path(target, source):
            raise StylekitError(f"{what} '{target}' is the input '{source}'; choose another name")
    check_writable_folder(target.parent, f"{what} folder")


def _say(level: str, message: str) -> None:
    """A warning (or worse) on stderr the way every command prints one: `warning: …`, in yellow."""
    click.secho(f"{level}: {message}", fg="yellow" if level == "warning" else None, err=True)


def _warn(message: str) -> None:
    _say("warning", message)


class _LibraryLog(logging.Handler):
    """stylekit's library log records (gram_cache, presets, onnx_features …), warnings and worse,
    handed to `say(level, message)`: printed the way the running command prints its own warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.say: Callable[[str, str], object] = _say

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.say(record.levelname.lower(), self.format(record))
        except Exception:
            self.handleError(record)


_LIBRARY_LOG = _LibraryLog()


def _print_library_log(say: Callable[[str, str], object], library: str = "stylekit") -> None:
    """Send a library's log records (stylekit's own by default) to `say` until the command ends (one
    handler, never two)."""
    logger = logging.getLogger(library)
    _LIBRARY_LOG.say = say
    logger.addHandler(_LIBRARY_LOG)
    click.get_current_context().call_on_close(lambda: logger.removeHandler(_LIBRARY_LOG))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stylekit")
def cli() -> None:
    """stylekit: neural style transfer (Gatys et al.) for people who edit images."""
    _print_library_log(_say)


@cli.command()
@click.argument("content", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--style", "styles", multiple=True, type=click.Path(dir_okay=False),
              help="Style image; repeat for several (see --style-blend).")
@click.option("--preset", help="A named preset instead of --style (see `stylekit presets list`); "
                               "flags override its options.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file: .png, .jpg, .webp, .avif or .tif.")
@quality_option
@engine_options_with_init_file
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "json", "none"]),
              default="auto", show_default=True, help="auto: a bar on a terminal, nothing otherwise.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a JSON report (time, iterations, losses, device, memory).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def apply(content: Path, styles: tuple[str, ...], preset: str | None, output: Path, quality: int,
          progress_mode: str, report: Path | None, debug: bool, **flags: object) -> None:
    """Stylise CONTENT with one or more --style images, or a --preset, and write -o OUTPUT.

    Examples: stylekit apply photo.jpg --style painting.jpg -o out.png;
    stylekit apply photo.jpg --preset ink-wash --steps 100 -o out.png
    """
    if bool(styles) == bool(preset):
        raise click.UsageError("give --preset NAME or --style images, not both" if styles
                               else "give either --preset NAME or at least one --style image")
    changes, init_file = flag_changes(flags)
    chosen = get_preset(preset) if preset else None
    style_files = [str(path) for path in chosen.style_paths] if chosen else list(styles)
    inputs = [str(content), *style_files, *([init_file] if init_file else [])]
    out_format = output_format(output)  # an unknown extension fails here, before any work
    _check_quality({out_format})
    _check_writable(output, "output", inputs)
    if report is not None:
        _check_writable(report, "report", inputs)
        if _same_path(report, str(output)):
            raise StylekitError(f"report '{report}' is the output image too; choose another name")
    picture = load_image(content)
    if picture.alpha is not None and out_format == "JPEG":
        _warn(f"JPEG has no transparency: the content's transparent parts are flattened onto white in "
              f"'{output}' (.png, .webp, .avif or .tif keep them)")
    init_image = load_image(init_file).rgb if init_file else None
    if chosen:
        request = replace(preset_request(chosen, picture.rgb, changes), init_image=init_image)
    else:
        request = StyleRequest(content=picture.rgb, styles=[load_image(s).rgb for s in styles],
                               options=StyleOptions().replace(**changes), init_image=init_image)
    if progress_mode == "auto":
        progress_mode = "bar" if sys.stderr.isatty() else "none"
    # torch loads here, after the arguments and files are checked
    from .engine import output_long_side, stylize
    height, width = picture.rgb.shape[:2]
    long_side = output_long_side(width, height, request.options.size)
    keeps = min(width, height) >= MIN_SIDE  # so that --size (its long side) works
    if "size" not in changes and long_side < max(width, height) and keeps:  # before the work: Ctrl-C is free
        _say("note", f"the output will be {long_side} px on its long side, smaller than the {width}×{height} "
                     f"photo ({_size_rule(request.options.size, preset)}); --size {max(width, height)} "
                     "keeps its size")
    if progress_mode == "json":
        result = stylize(request, progress=json_lines(sys.stdout, lambda: _warn(
            "nothing reads the progress events any more (stdout is closed); styling goes on without them")))
    else:
        with progress_bar() if progress_mode == "bar" else nullcontext(None) as bar:
            result = stylize(request, progress=bar)
    for message in result.warnings:
        _warn(message)
    metadata = {"software": f"stylekit {__version__}", "content": content.name,
                "preset": preset, "styles": [Path(s).name for s in style_files], **result.report()}
    save_image(output, result.image, picture.alpha, metadata=metadata, quality=quality,
               source_metadata=picture.source_metadata)
    if report is not None:
        try:
            write_json(report, {"output": str(output), **result.report()})
        except OSError as exc:  # the image is safe: say so, and what failed
            raise StylekitError(f"cannot write the report '{report}' ({exc.strerror or exc}); the image is "
                                f"written: '{output}'") from None
    if progress_mode == "json":  # a reader gone (stdout closed) misses it: the image is written
        write_line(sys.stdout, json.dumps({"event": "done", "output": str(output), **result.report()}))
    else:
        click.echo(f"wrote {output} ({result.width}×{result.height}, {result.iterations} iterations, "
                   f"{result.seconds:.1f} s on {result.device})", err=True)


@cli.group()
def weights() -> None:
    """Manage the network weights (ImageNet VGG19 and friends)."""


@weights.command("status")
def weights_status_command() -> None:
    """Show which ImageNet weights are cached (checksums verified) and where."""
    from .weights_cache import weights_status  # not .weights: torch would load for nothing
    for row in weights_status():
        click.echo(f"{row['backbone']:9} {row['state']:8} {row['path']}")


@weights.command("download")
@click.option("--backbone", type=click.Choice(BACKBONE_NAMES), default="vgg19",
              show_default=True, help="Which network's weights.")
def weights_download(backbone: str) -> None:
    """Download torchvision's ImageNet weights into torch's cache (checksum verified)."""
    from .weights import download_imagenet
    path = download_imagenet(backbone, progress=True)
    click.echo(f"{backbone} weights cached at {path}")


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def weights_import(file: Path) -> None:
    """Check a torchvision-format weights FILE and copy it into the cache for offline use."""
    from .weights import import_weights
    backbone, target = import_weights(file)
    click.echo(f"imported {backbone} weights from {file} to {target}")


@cli.command("export-onnx")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .onnx file to write.")
@click.option("--weights", "weights_spec", default="auto", show_default=True,
              metavar="auto|imagenet|random|PATH", help="Network weights to bake in.")
@click.option("--backbone", type=click.Choice(BACKBONE_NAMES), default="vgg19",
              show_default=True, help="The network to export.")
@click.option("--layers", help="Feature outputs, comma-separated (default: content and style layers).")
@click.option("--gram-layers", help="Layers that also get a gram_<layer> output "
                                    "(default: the backbone's style layers among --layers).")
@click.option("--pooling", type=click.Choice(POOLINGS), default="max", show_default=True,
              help="The pooling the exported network uses (as apply's --pooling).")
def export_onnx_command(output: Path, weights_spec: str, backbone: str, layers: str | None,
                        gram_layers: str | None, pooling: str) -> None:
    """Export the feature extractor as ONNX (input `image`: N×3×H×W RGB in [0, 1]).

    Example: stylekit export-onnx --weights imagenet -o vgg19-features.onnx
    """
    if output.suffix.lower() != ".onnx":
        raise StylekitError(f"output '{output}' must end in .onnx")
    _check_writable(output, "output", [weights_spec] if os.path.isfile(weights_spec) else [])
    from .features import backbone_spec
    from .onnx_features import OPSET, checked_layers, export_onnx
    from .weights import resolve_weights
    spec = backbone_spec(backbone)
    chosen = _names(layers) or tuple(dict.fromkeys(spec.content_layers + spec.style_layers))
    grams = _names(gram_layers) if gram_layers is not None \
        else tuple(name for name in chosen if name in spec.style_layers)
    chosen, grams = checked_layers(backbone, chosen, grams)  # before the slow weights and export
    weights = resolve_weights(weights_spec, backbone, progress=sys.stderr.isatty())
    if weights.warning:
        _warn(weights.warning)
    export_onnx(weights.state_dict, backbone, chosen, grams, pooling, output)
    click.echo(f"wrote {output} (outputs {', '.join(chosen)}; Grams of {', '.join(grams) or 'none'}; "
               f"opset {OPSET}; {weights.description} weights)", err=True)


@cli.group()
def presets() -> None:
    """Named styles: the built-in ones and your own (user presets override built-ins by name)."""


@presets.command("list")
def presets_list() -> None:
    """Show every preset: name, where it comes from, title."""
    for preset in list_presets():
        click.echo(f"{preset.name:16} {'built-in' if preset.builtin else 'user':8} {preset.title}")


@presets.command("show")
@click.argument("name")
def presets_show(name: str) -> None:
    """Show a preset's file, style images with blend weights, and options."""
    preset = get_preset(name)
    click.echo(f"{preset.name}: {preset.title} ({'built-in' if preset.builtin else 'user'})")
    click.echo(f"file: {preset.path}")
    for path, weight in zip(preset.style_paths, preset.blend, strict=True):
        click.echo(f"style: {path} (weight {weight:g})")
    for key, value in preset.options.items():
        click.echo(f"{key} = {','.join(map(str, value)) if isinstance(value, tuple) else value}")


@presets.command("add")
@click.argument("name")
@click.option("--style", "styles", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Style image (copied into the preset folder); repeat for several.")
@click.option("--title", help="A human-readable title (default: NAME).")
@click.option("--force", is_flag=True, help="Replace a user preset of the same name.")
@engine_options
def presets_add(name: str, styles: tuple[str, ...], title: str | None, force: bool,
                **flags: object) -> None:
    """Save --style images and the engine flags given as user preset NAME ([a-z0-9-]+).

    Example: stylekit presets add my-ink --style ink.jpg --style-weight 3e6 --preserve-color luminance
    """
    changes, init_file = flag_changes(flags)
    if init_file:
        raise click.UsageError("a preset cannot keep an --init FILE (use content, noise or style)")
    preset = add_preset(name, styles, changes, title=title, replace=force)
    click.echo(f"saved preset '{preset.name}' in {preset.path}")


@presets.command("remove")
@click.argument("name")
def presets_remove(name: str) -> None:
    """Delete user preset NAME; the style images it copied go an hour later, so a run that loaded it
    still finishes (built-ins cannot be removed)."""
    path = remove_preset(name)
    click.echo(f"removed {path} (the style images it copied go with the next presets add or remove an "
               "hour from now or later: runs that loaded it still finish)")


@presets.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def presets_validate(file: Path) -> None:
    """Check a preset FILE: its keys, option values and style images."""
    preset = load_preset_file(file)
    for style in preset.style_paths:
        load_image(style)  # decoded, not only found: a truncated or mislabelled image fails here
    weights = str(preset.options.get("weights", "auto"))
    if names_a_file(weights) and not Path(weights).is_file():  # else only a run would find out
        raise StylekitError(f"preset file '{file}': key 'options.weights' names '{weights}', which is "
                            "not there")
    click.echo(f"{file}: ok ('{preset.name}', {len(preset.style_paths)} style image(s), "
               f"{len(preset.options)} option(s))")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any but loopback needs the bearer token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port (0: any free one).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Require the bearer token in this file (off loopback the default is server-token "
                   "in stylekit's config folder, created with mode 0600 when missing).")
@click.option("--require-token", is_flag=True, help="Ask for the token on loopback too.")
@click.option("--weights", default="auto", show_default=True, metavar="auto|imagenet|random|PATH",
              help="Network weights for every job.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where every job runs (auto: CUDA, then Apple's MPS, then the CPU).")
@click.option("--backbone", type=click.Choice(BACKBONE_NAMES), default="vgg19", show_default=True,
              help="Network for every job (a preset's own is overridden, as its weights are).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.01), default=25.0, show_default=True,
              help="Largest request body (image plus style image).")
@click.option("--max-pixels", type=click.IntRange(min=256), default=16_000_000, show_default=True,
              help="Largest image, in and out.")
@click.option("--max-queue", type=click.IntRange(min=1), default=8, show_default=True,
              help="Jobs waiting at most; more get HTTP 429.")
def serve(host: str, port: int, token_file: Path | None, require_token: bool, weights: str,
          device: str, backbone: str, max_upload_mb: float, max_pixels: int, max_queue: int) -> None:
    """Run the HTTP server the GIMP plug-in talks to (API at /v1, schema at /openapi.json).

    Example: stylekit serve --weights imagenet
    """
    from . import server  # FastAPI and uvicorn load only for this command
    from . import token_file as tokens

    sock = server.listen(host, port)  # first: a bad --host must not leave a token file behind
    token = None
    if require_token or token_file or not is_loopback(host):
        token_path = token_file or tokens.default_token_file()
        token = tokens.load_or_create_token(token_path)
        click.echo(f"clients must send 'Authorization: Bearer <token>' (token in {token_path})", err=True)
    settings = server.ServerSettings(weights=weights, device=device, backbone=backbone,
                                     max_upload_bytes=round(max_upload_mb * 2**20),
                                     max_pixels=max_pixels, max_queue=max_queue, token=token)
    click.echo(f"loading the network ({backbone}, {weights} weights, device {device})...", err=True)
    warm = server.warm_up(settings)
    for message in warm.warnings:
        _warn(message)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"stylekit server listening on http://{shown}:{sock.getsockname()[1]} "
               f"({warm.device}, {warm.weights}); Ctrl-C stops it", err=True)
    server.serve(settings, sock, warm)


@cli.command()
@click.argument("inbox", required=False, type=click.Path(path_type=Path))
@click.option("--preset", help="Preset for images dropped at the top of INBOX "
                               "(INBOX/<preset>/ sub-folders use their own).")
@click.option("--out", "outbox", type=click.Path(file_okay=False, path_type=Path),
              help="Folder the styled images are written to.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A pipeline.toml watching several folders (see pipeline/pipeline.example.toml).")
@format_option
@quality_option
@ray_options
@engine_options
@click.option("--settle", type=click.FloatRange(min=0),
              help="Seconds a file must stay unchanged before it is taken (default 2).")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line, for machines.")
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep queued/processing/done/failed counts in this JSON file.")
@click.option("--status", "show_status", is_flag=True,
              help="Print the counts for INBOX (or a pipeline.toml) and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def watch(inbox: Path | None, preset: str | None, outbox: Path | None, config_file: Path | None,
          out_format: str | None, quality: int, engine_name: str, ray_address: str,
          gpus_per_task: float | None, settle: float | None, log_json: bool, status_file: Path | None,
          show_status: bool, debug: bool, **flags: object) -> None:
    """Hot folder: style every image dropped into INBOX with --preset and write it to --out.

    \b
    Examples: stylekit watch inbox --preset ink-wash --out outbox
              stylekit watch --config pipeline.toml
              stylekit watch --config pipeline.toml --engine ray
              stylekit watch --status inbox
    """
    from .pipeline import config, status  # light: watchdog and torch load below
    from .pipeline.log import EventLog
    from .pipeline.stopping import Stopping

    if show_status:
        text, problem = status.report(inbox or config_file)
        click.echo(text)
        if problem:  # an inbox is missing: exit 1, so that a monitoring check notices
            raise StylekitError(problem)
        return
    stopping = Stopping(threading.Event())
    with stopping.on_signals():  # from here a signal is a clean stop, also while torch loads (seconds)
        from .pipeline import watcher

        log_json = log_json or config.asks_for_json(config_file)
        _LAST_LINE.as_json = log_json  # and so is the error that may end the command
        for library in ("stylekit", "watchdog"):  # a library warning is an event like the watcher's own
            _print_library_log(EventLog(log_json), library)
        overrides, init_file = flag_changes(flags)
        if init_file:
            raise click.UsageError("watch cannot use an --init FILE (use content, noise or style)")
        settings = config.from_cli(inbox, config_file, preset, outbox, out_format, overrides, settle,
                                   log_json, status_file, quality=quality if _given("quality") else None,
                                   engine=engine_name, ray_address=ray_address, gpus_per_task=gpus_per_task)
        if "same" not in {folder.format for folder in settings.folders}:  # else a JPEG may come in
            _check_quality({output_format(f"x.{folder.format}") for folder in settings.folders})
        watcher.watch(settings, stopping)


@cli.command()
@click.argument("inputs", metavar="INPUT_DIR_OR_GLOB")
@click.option("--preset", required=True, help="The preset every image gets (flags override its options).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the outputs, <stem>.<preset>.<ext> (created if missing).")
@format_option
@quality_option
@ray_options
@engine_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def batch(inputs: str, preset: str, out: Path, out_format: str | None, quality: int, engine_name: str,
          ray_address: str, gpus_per_task: float | None, debug: bool, **flags: object) -> None:
    """Style every image of a folder or glob with --preset into --out, each exactly once.

    A re-run skips images whose output exists (outputs of another --format are other outputs, made
    anew), and batches sharing OUT never style an image twice; failures are listed in
    OUT/stylekit-failed.json. Inputs in a running `stylekit watch` inbox are refused.

    \b
    Examples: stylekit batch photos/ --preset ink-wash --out styled/
              stylekit batch 'shoots/**/*.jpg' --preset woodcut --out styled/ --engine ray
    """
    from tqdm import tqdm

    from . import batch as batching
    from . import ray_engine

    changes, init_file = flag_changes(flags)
    if init_file:
        raise click.UsageError("batch cannot use an --init FILE (use content, noise or style)")
    recipe = replace(batching.make_recipe(get_preset(preset), changes), quality=quality)
    items = batching.plan(batching.discover(inputs), out, recipe.preset, out_format or "same")
    _check_quality({output_format(item.output) for item in items})

    def started(pool: ray_engine.Pool) -> None:
        hosts = {worker.rpartition(":")[0] for worker in pool.workers}
        click.echo(f"{len(pool.actors)} Ray worker(s) on {len(hosts)} node(s); loading the network", err=True)

    engine = batching.run_local if engine_name == "local" else \
        ray_engine.engine(ray_address, gpus_per_task, on_start=started)
    out.mkdir(parents=True, exist_ok=True)
    warned: set[str] = set()  # each warning once: random weights would otherwise repeat per image
    noted: list[batching.Outcome] = []  # the first output smaller than its input, said once
    with tqdm(total=len(items), unit="img", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        _print_library_log(lambda level, message: bar.write(f"{level}: {message}", file=sys.stderr))

        def show(outcome: batching.Outcome) -> None:
            if outcome.reason:  # failed, or skipped for another reason than its output being there
                bar.write(f"{outcome.status}: {outcome.item.source}: {outcome.reason}", file=sys.stderr)
            for message in outcome.warnings:
                if message not in warned:
                    warned.add(message)
                    bar.write(f"warning: {outcome.item.source}: {message}", file=sys.stderr)
            if "size" not in changes and not noted and max(outcome.size) < max(outcome.content_size):
                noted.append(outcome)
                (width, height), (from_width, from_height) = outcome.size, outcome.content_size
                bar.write(f"note: outputs may be smaller than their inputs: {outcome.item.source} came out "
                          f"{width}×{height} from {from_width}×{from_height} "
                          f"({_size_rule(recipe.template.options.size, preset)}); --size PX sets every "
                          "output's long side", file=sys.stderr)
            bar.update(1)

        summary = batching.run_batch(out, items, recipe, engine, show)
    click.echo(f"batch: {summary.line()}", err=True)
    if summary.failures:
        raise StylekitError(f"{len(summary.failures)} of {len(items)} images failed "
                            f"(reasons in {out / batching.FAILED_FILE})")


cli.add_command(gimp)


def _one_line(text: str) -> str:
    """An error as one printable line: control characters (a newline in a path) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class _LastLine:
    """How main prints a failure: as text, or as a JSON event where the command logs JSON (watch with
    --log-json, or log_json in its config), so that the stream stays machine-readable to its end."""

    as_json: bool = False

    def __call__(self, event: str, text: str) -> None:
        if self.as_json:
            from .pipeline.log import EventLog  # light: json and datetime

            EventLog(as_json=True)(event, text)
        else:
            click.echo(_one_line(text), err=True)


_LAST_LINE = _LastLine()
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click ≥ 8.2; before, an Exit


def main(argv: list[str] | None = None) -> int:
    """Run the CLI so every failure is one line on stderr and a non-zero exit (--debug: traceback)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("STYLEKIT_DEBUG", "") not in ("", "0")
    _LAST_LINE.as_json = "--log-json" in args
    try:
        cli.main(args=args, prog_name="stylekit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        _LAST_LINE("interrupted", "stylekit: interrupted")
        return 130
    except _NO_ARGS_IS_HELP as exc:  # `stylekit`, `stylekit presets`: the help as it is, not one line
        exc.show()
        return exc.exit_code
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        context = f" {exc.ctx.command_path.split(' ', 1)[-1]}" if getattr(exc, "ctx", None) else ""
        where = context if context.strip() != "stylekit" else ""
        message = exc.format_message().replace("\n", " ")
        _LAST_LINE("error", f"stylekit{where}: error: {message}")
        return exc.exit_code
    except StylekitError as exc:
        if debug:
            traceback.print_exc()
        _LAST_LINE("error", f"stylekit: error: {exc}")
        return 2 if isinstance(exc, UsageError) else 1
    except OSError as exc:  # the system said no (disk full, read-only, permissions): no bug of ours
        if debug:
            traceback.print_exc()
        where = f": '{exc.filename}'" if exc.filename else ""
        _LAST_LINE("error", f"stylekit: error: {exc.strerror or exc}{where}")
        return 1
    except Exception as exc:  # the last line of defence: never a traceback without --debug
        if debug:
            traceback.print_exc()
        _LAST_LINE("error", f"stylekit: error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
