"""itae-search: find images in an itae-cluster output folder, by image or text, with relevance feedback."""

from __future__ import annotations

from pathlib import Path

import click
from itae_export.cli._common import PathParam, model_choice, report_errors

from itae_export.errors import InputError
from itae_export.images import DEFAULT_MAX_PIXELS

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
METHOD_CHOICES = ("knn", "rocchio", "logreg", "none")


def query_options(f):
    decorators = [
        click.argument("collection", type=PathParam(file_okay=False)),
        click.option("--image", type=PathParam(dir_okay=False), default=None, help="Query by this image file."),
        click.option("--like", default=None, help="Query by an image of the collection (its path as in assignments.csv)."),
        click.option("--text", default=None, help="Query by text (needs --text-model)."),
        click.option("--onnx", type=PathParam(dir_okay=False), default=None,
                     help="The image model for --image [the one recorded in summary.json]."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
                     help="[--image] A larger image is refused before decoding, as in itae-cluster."),
        click.option("--text-model", type=PathParam(file_okay=False), default=None,
                     help="A folder written by 'itae-search export-text' from the same checkpoint."),
        click.option("--method", type=click.Choice(METHOD_CHOICES), default=None,
                     help="Relevance feedback: knn (Nara et al.), rocchio, logreg, none [knn]."),
        click.option("-k", "k", type=click.IntRange(min=1), default=None, help="Results per page [20]."),
        click.option("--session", "session_path", type=PathParam(dir_okay=False), default=None,
                     help="Session file: resumed when it exists and no query is given, saved after each round."),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="cpu", show_default=True),
        click.option("--kind", type=click.Choice(["auto", "exact", "ivf"]), default="auto", show_default=True,
                     help="Index kind (auto: exact below the measured size, IVF above)."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def _open(collection, kind, **outputs):
    """The index, after the files this command will write (``outputs``: option name -> path or
    None) are checked, so that a bad path fails before any work."""
    from itae_export.files import check_writable
    from itae_export.search.index import load_index

    for option, path in outputs.items():
        if path is not None:
            check_writable(path, option, folder=False)
    return load_index(collection, kind=kind, log=lambda m: click.echo(m, err=True))


def _session(index, collection, session_path, feedback, method, k, image, like, text, onnx, text_model, device,
             max_pixels=DEFAULT_MAX_PIXELS):
    from itae_export.search.queries import start_or_resume

    if image is None and like is None and text is None and not (session_path and Path(session_path).is_file()):
        raise click.UsageError("give a query (--image, --like or --text) or an existing --session file")
    return start_or_resume(index, collection, session_path=session_path, feedback=feedback, method=method, k=k,
                           image=image, like=like, text=text, onnx=onnx, text_model=text_model, device=device,
                           max_pixels=max_pixels)


@click.group(context_settings=CTX)
def main():
    """Search the images of an itae-cluster output folder (COLLECTION), with relevance feedback."""


@main.command("index", context_settings=CTX)
@click.argument("collection", type=PathParam(file_okay=False))
@click.option("--kind", type=click.Choice(["auto", "exact", "ivf"]), default="auto", show_default=True)
@report_errors
def index_cmd(collection, kind):
    """Build (or rebuild) the search index beside the embeddings, in COLLECTION/search/."""
    from itae_export.search.index import build_index

    idx = build_index(collection, kind=kind, log=lambda m: click.echo(m, err=True))
    extra = f", nlist {idx.info['ivf']['nlist']}, nprobe {idx.nprobe}" if idx.kind == "ivf" else ""
    click.echo(f"{idx.kind} index of {len(idx)} vectors (dim {idx.dim}{extra}) in {Path(collection) / 'search'}")


@main.command("query", context_settings=CTX)
@query_options
@click.option("--feedback", type=PathParam(dir_okay=False), default=None,
              help="Judgments to apply first: CSV path,label or JSON {relevant: [...], irrelevant: [...]}.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--output", "-o", type=PathParam(dir_okay=False), default=None, help="Write the ranked list here [stdout].")
@report_errors
def query_cmd(collection, image, like, text, onnx, text_model, max_pixels, method, k, session_path, device, kind,
              feedback, fmt, output):
    """Rank the images not judged yet; write the ranked paths as CSV or JSON."""
    from itae_export.search.session import write_ranked

    index = _open(collection, kind, **{"--session": session_path, "--output": output})
    session = _session(index, collection, session_path, feedback, method, k, image, like, text, onnx, text_model, device,
                       max_pixels)
    results = session.results(index)
    if session_path:
        session.save(session_path)
    out = write_ranked(results, output, fmt, index.root)
    if output is None:
        click.echo(out.encode("utf-8", "surrogateescape"), nl=False)  # a name that is not UTF-8: its bytes


@main.command("serve", context_settings=CTX)
@query_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host (the page has no login).")
@report_errors
def serve_cmd(collection, image, like, text, onnx, text_model, max_pixels, method, k, session_path, device, kind, host,
              port, allow_remote):
    """A local web page: the result grid, relevant/irrelevant toggles and a Refine button."""
    from itae_export.search.server import SearchApp, check_bind, is_loopback_host, make_server, server_url

    try:
        check_bind(host, allow_remote)
    except InputError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1], param_hint="--host") from None
    session_path = session_path or str(Path(collection) / "search" / "session.json")
    index = _open(collection, kind, **{"--session": session_path})
    session = _session(index, collection, session_path, None, method, k, image, like, text, onnx, text_model, device,
                       max_pixels)
    server = make_server(SearchApp(index, session, session_path), host, port, allow_remote)
    if not is_loopback_host(host):
        click.echo(f"warning: --allow-remote: anyone who can reach {host} port {server.server_address[1]} can see "
                   "this collection's images and change the session (the page has no login)", err=True)
    click.echo(f"itae-search: {server_url(server)}  (session {session_path}; Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


@main.command("export-text", context_settings=CTX)
@click.option("--model", "model_name", type=model_choice(), required=True, help="A CLIP model of the registry.")
@click.option("--weights", type=PathParam(exists=True), required=True,
              help="The CLIP checkpoint the image tower came from (OpenAI .pt, open_clip, Hugging Face CLIPModel).")
@click.option("--out", "out_dir", type=PathParam(file_okay=False), required=True, help="Folder for text.onnx, text.json, vocab.json, merges.txt.")
@report_errors
def export_text_cmd(model_name, weights, out_dir):
    """Export CLIP's text tower to ONNX with its tokenizer beside it; validated against PyTorch."""
    from itae_export.onnx.text_export import export_text_tower

    result = export_text_tower(model_name, weights, out_dir)
    click.echo(f"{result['onnx']}: validated, max rel. error {result['validation']['max_rel_err']:.2g}")


if __name__ == "__main__":
    main()
