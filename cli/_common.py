"""Options and error handling shared by the itae-* commands."""

from __future__ import annotations

import errno
import functools
import sys

import click

from itae_export.errors import InputError, ITAEError, OptionError, OutputError
from itae_export.files import describe_os_error
from itae_export.onnx.contract import PRECISIONS
from itae_export.registry import GROUPS, POS_RULES, ROWS, SOURCES, STRATEGIES, list_models, parse_theta


class PathParam(click.Path):
    """``click.Path`` that refuses an empty value: ``--out "$OUT"`` with ``OUT`` unset would otherwise
    mean the current folder (click and pathlib read "" as "."), so a careless script would cluster
    or overwrite whatever folder it ran in. Every path option and argument of the commands is one."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value == "":
            self.fail("an empty path (an unset shell variable?); give one, or '.' for the current folder",
                      param, ctx)
        return super().convert(value, param, ctx)


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
        click.option("--weights", type=PathParam(dir_okay=True), default=None,
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


def boundary_error(e: BaseException) -> ITAEError | None:
    """An error that escaped the library but was caused by the user's files, options or disk, as
    one line naming the file and what to do; None for anything else (a bug: let it show).

    OSError (full disk, read-only, no permission, a path under a file), sqlite3 (a store or record
    that cannot be read), pyarrow (a parquet file that is not one), JSON, faiss and ONNX Runtime
    (a model or input the runtime rejects). Never advises deleting a store: the causes here are
    the disk or the input, not the store's health."""
    import json
    import sqlite3

    name = type(e).__name__
    mod = type(e).__module__ or ""
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else "a file"
        what = {errno.ENOSPC: "free some space and run the same command again (finished work is kept)",
                errno.EDQUOT: "free some space and run the same command again (finished work is kept)",
                errno.EROFS: "choose a writable --out (or set ITAE_CACHE_DIR to a writable folder)",
                errno.EACCES: "check its permissions, or choose another --out",
                errno.EPERM: "check its permissions, or choose another --out",
                errno.ENOTDIR: "a part of the path is a file: choose another path",
                errno.ENOENT: "check the path"}.get(e.errno, "check the path and the disk")
        return OutputError(f"{where}: {describe_os_error(e)}; {what}")
    if isinstance(e, sqlite3.Error):
        if "full" in str(e).lower():
            return OutputError(f"the disk is full ({e}); free some space and run the same command again "
                               "(finished work is kept)")
        if "readonly" in str(e).lower() or "read-only" in str(e).lower():
            return OutputError(f"an SQLite file of this run cannot be written ({e}): the filesystem is read-only; "
                               "choose a writable --out")
        return OutputError(f"an SQLite file of this run cannot be used ({e}); if the disk is full or read-only, "
                           "fix that and run the same command again")
    if isinstance(e, json.JSONDecodeError):
        return InputError(f"an input JSON file is not valid JSON ({e}): the model's .json manifest, a summary.json "
                          "or a manifest.json given; check that file, or write it again with the command that made it")
    if mod.startswith("pyarrow") and "Arrow" in "".join(c.__name__ for c in type(e).__mro__):
        return InputError(f"a parquet/Arrow file cannot be read ({name}: {e}); check that the input is a parquet "
                          "file written whole")
    if mod.startswith("onnxruntime"):
        return InputError(f"ONNX Runtime rejected the model or its input ({name}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "check --onnx (itae-validate MODEL tells what is wrong)")
    if mod.startswith("faiss") or (isinstance(e, RuntimeError) and "faiss" in str(e).lower()):
        return InputError(f"faiss failed ({str(e).splitlines()[0] if str(e) else name}); check --k and --sample-size "
                          "against the number of vectors")
    return None


def report_errors(f):
    """Library errors become one clear line (exit 2 for a bad option, 1 otherwise); errors the user's
    files or disk caused (:func:`boundary_error`) too; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except ITAEError as e:
            raise to_click_error(e) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - mapped when the user's input caused it, else re-raised
            mapped = boundary_error(e)
            if mapped is None:
                raise
            raise to_click_error(mapped) from None

    return wrapper
