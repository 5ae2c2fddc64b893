"""Options and error handling shared by the itae-* commands."""

from __future__ import annotations

import functools
import sys

import click

from itae_export.errors import InputError, ITAEError, OptionError
from itae_export.onnx.contract import PRECISIONS
from itae_export.registry import GROUPS, POS_RULES, ROWS, SOURCES, STRATEGIES, list_models, parse_theta


def model_choice() -> click.Choice:
    return click.Choice(list_models(include_aliases=True), case_sensitive=False)


def itae_flags(f):
    """--theta --source --group --strategy --rows --lsa --no-itae (defaults: the spec's, per model)."""
    decorators = [
        click.option("--theta", type=str, default=None, callback=theta_param,
                     help="Norm threshold (default: the model's, from the paper). 'auto' picks it from "
                          "--calibration-images."),
        click.option("--source", type=click.Choice(SOURCES), default=None, help="Projection whose norms find artifacts [query]."),
        click.option("--group", type=click.Choice(GROUPS), default=None, help="Which side of theta is the artifact set [minority]."),
        click.option("--strategy", type=click.Choice(STRATEGIES), default=None, help="Substitute logit of artifact columns [min]."),
        click.option("--rows", type=click.Choice(ROWS), default=None, help="Attention rows edited: the CLS row or all [cls]."),
        click.option("--lsa/--no-lsa", default=None, help="Also mask the diagonal of the edited rows (Table A3) [off]."),
        click.option("--no-itae", is_flag=True, default=False, help="Export the unpatched baseline through the same path."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def weight_flags(f):
    decorators = [
        click.option("--weights", type=click.Path(dir_okay=True), default=None,
                     help="Local checkpoint (official .pth/.pt, Hugging Face dir or .safetensors, timm, open_clip, "
                          "or an ONNX file with Hugging Face names). Default: download the official weights."),
        click.option("--pos-rule", type=click.Choice(POS_RULES), default=None,
                     help="Override the position-embedding interpolation rule (default: follows the weights' source)."),
        click.option("--resolution", type=click.IntRange(min=1), default=None, help="Input height and width, a multiple of the patch size [224]."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def theta_param(ctx, param, value):
    """Click callback: the registry's one check of theta; a bad value is a usage error (exit 2)."""
    try:
        return parse_theta(value, allow_auto=True)
    except InputError as e:
        raise click.BadParameter(str(e).removeprefix("--theta: ")) from None


def to_click_error(e: ITAEError) -> click.ClickException:
    """A library error as one line: exit 2 (usage) for a bad option value, else 1."""
    if isinstance(e, OptionError):
        return click.UsageError(str(e))
    return click.ClickException(str(e))


def report_errors(f):
    """Library errors become one clear line (exit 2 for a bad option, 1 otherwise); Ctrl-C exits 130
    without a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except ITAEError as e:
            raise to_click_error(e) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
