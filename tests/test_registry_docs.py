"""The registry is the one source of truth: CLI choices, aliases, docs."""

import subprocess
import sys
from pathlib import Path

import pytest

from itae_export import ITAEOptions, UnknownModelError, get_model_spec, list_models
from itae_export.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
    "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
    "clip_vitb16", "clip_vitl14", "clip_vitb32", "deit3_base16", "deit3_large16",
}


def test_registry_has_every_model_of_the_issue():
    assert set(list_models()) == EXPECTED


@pytest.mark.parametrize("name,canonical,theta,dim", [
    ("vitl14", "dinov2_vitl14", 3.0, 1024), ("vits14_reg", "dinov2_vits14_reg", 2.0, 384),
    ("clip_vitb16", "clip_vitb16", 2.0, 512), ("deit3-l16", "deit3_large16", 3.25, 1024),
    ("DINOv2_ViTg14", "dinov2_vitg14", 3.0, 1536),
])
def test_aliases_and_spec_defaults(name, canonical, theta, dim):
    s = get_model_spec(name)
    assert (s.name, s.theta, s.embed_dim) == (canonical, theta, dim)


def test_theta_flag_and_preprocessing_per_family():
    assert get_model_spec("dinov2_vits14").theta_note  # the paper did not apply ITAE there
    assert get_model_spec("clip_vitl14").preprocessing.mean[0] == pytest.approx(0.48145466)
    assert get_model_spec("dinov2_vitg14").arch.ffn == "swiglu" and get_model_spec("dinov2_vitg14").arch.mlp_hidden == 4096
    assert get_model_spec("dinov2_vitb14").pos_rule == "dinov2-offset"
    assert get_model_spec("dinov2_vitb14_reg").pos_rule == "bicubic-aa"


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="dinov2_vitl14"):
        get_model_spec("vit_huge")


@pytest.mark.parametrize("kwargs,opt", [({"theta": -1}, "--theta"), ({"theta": float("nan")}, "--theta"),
                                        ({"source": "queries"}, "--source"), ({"strategy": "max"}, "--strategy")])
def test_bad_options_name_the_flag(kwargs, opt):
    with pytest.raises(InputError, match=opt):
        ITAEOptions(**kwargs)


def test_generated_docs_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
