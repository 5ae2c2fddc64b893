"""Regenerate docs/cli.md (from each command's --help) and docs/models.md (from the registry).

    python scripts/gen_docs.py          # write
    python scripts/gen_docs.py --check  # exit 1 if the docs are out of date (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def commands() -> list[tuple[str, str]]:
    """(console script, module) of every command, from pyproject.toml's [project.scripts]."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return [(name, target.split(":")[0]) for name, target in scripts.items()]


def cli_md() -> str:
    import importlib

    out = ["# Command-line reference", "",
           "Generated from each command's `--help` by `scripts/gen_docs.py`; a test fails when it is stale.", ""]
    for name, module in commands():
        cmd = importlib.import_module(module).main
        text = CliRunner().invoke(cmd, ["--help"], prog_name=name, terminal_width=100).output
        out += [f"## {name}", "", "```text", text.rstrip(), "```", ""]
        for sub in getattr(cmd, "commands", {}):  # a command group: each subcommand's help too
            text = CliRunner().invoke(cmd, [sub, "--help"], prog_name=name, terminal_width=100).output
            out += [f"### {name} {sub}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(out)


def models_md() -> str:
    from itae_export.registry import get_model_spec, list_models

    out = ["# Models", "", "Generated from the registry (`itae_export/registry.py`) by `scripts/gen_docs.py`.", "",
           "| model | alias | family | default theta | embedding dim | tokens at 224 | official weights | Hugging Face |",
           "|---|---|---|---|---|---|---|---|"]
    notes = []
    for n in list_models():
        s = get_model_spec(n)
        a = s.arch
        tokens = 1 + a.num_register_tokens + (224 // a.patch_size) ** 2
        out.append(f"| `{s.name}` | `{', '.join(s.aliases)}` | {s.family} | {s.theta:g}{' *' if s.theta_note else ''} | "
                   f"{s.embed_dim} | {tokens} | [{s.weight_format}]({s.url}) | `{s.hf_hub_id}` |")
        if s.theta_note:
            notes.append(f"\\* `{s.name}`: {s.theta_note}.")
    out += [""] + notes + ["", "Preprocessing: every exported model records its own (resolution, interpolation, mean and "
                           "std: ImageNet's for DINOv2 and DeiT III, CLIP's own for CLIP) in its manifest; the steps "
                           "from a file's bytes to `pixel_values` are stated once, in "
                           "[the contract](onnx-contract.md#preprocessing-from-the-manifest).", ""]
    return "\n".join(out)


def main() -> int:
    check = "--check" in sys.argv
    stale = []
    for path, text in ((ROOT / "docs" / "cli.md", cli_md()), (ROOT / "docs" / "models.md", models_md())):
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/gen_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
