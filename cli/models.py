"""itae-models: the registry as a table."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the full registry as JSON.")
def main(as_json):
    """List the models itae-export knows, with aliases, default theta and weight sources."""
    from itae_export.registry import get_model_spec, list_models

    specs = [get_model_spec(n) for n in list_models()]
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in specs], indent=2))
        return
    click.echo(f"{'model':<20} {'alias':<12} {'theta':>5} {'dim':>5}  weights")
    for s in specs:
        click.echo(f"{s.name:<20} {','.join(s.aliases):<12} {s.theta:>5g} {s.embed_dim:>5}  {s.url}")


if __name__ == "__main__":
    main()
