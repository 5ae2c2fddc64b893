"""``python tests/docs_shim.py COMMAND ARGS...``: run an itae-* command as installed, with a tiny
random model of the requested model's family served in place of the official weights (no
download, seconds instead of minutes). Used by tests/test_docs_snippets.py; the numbers mean nothing."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tiny import random_model, tiny_spec  # noqa: E402

from itae_export.registry import get_model_spec  # noqa: E402
from itae_export.weights import checkpoints  # noqa: E402

COMMANDS = {"itae-export": "export", "itae-validate": "validate", "itae-cluster": "cluster",
            "itae-inspect": "inspect", "itae-models": "models"}


def fake_load_model(spec_or_name, itae=None, weights=None, pos_rule=None, download=True):
    """What checkpoints.load_model returns, for a tiny random model of the same family."""
    from itae_export.model.vit import build_model

    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.name
    base = get_model_spec(name.removeprefix("tiny_"))
    spec = tiny_spec(base.name)
    path = Path(os.environ.get("ITAE_DOCS_WEIGHTS_DIR", ".")) / f"tiny_{base.name}.pth"
    if not path.is_file():
        torch.save(random_model(spec, seed=0).state_dict(), path)
    m = build_model(spec, itae, pos_rule=pos_rule or spec.pos_rule)
    m.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return m.eval(), checkpoints.LoadedWeights(format="dinov2-hub", pos_rule=m.pos_rule, source=str(path),
                                               sha256=checkpoints.sha256_file(path), path=str(path))


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    checkpoints.load_model = fake_load_model
    module = importlib.import_module(f"itae_export.cli.{COMMANDS[cmd]}")
    sys.argv = [cmd, *args]
    module.main()


if __name__ == "__main__":
    main()
