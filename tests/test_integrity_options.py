"""Options checked before any work starts (issue 22): a malformed --int8-plan, a bad --triton
folder or model name, an --output that cannot be written all fail in one line before the
calibration or the export; --triton without tritonclient still writes the repository."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_cli_export import tiny_weights  # noqa: F401 - the fixture

import itae_export.calibrate.auto as auto
import itae_export.onnx.export as export_mod
from itae_export.cli import export as export_cli
from itae_export.errors import MissingDependencyError, OptionError
from itae_export.onnx.triton import check_model_name, write_triton_repository

GOOD_PLAN = {"keep_fp32": ["blocks.0.attn.qkv"], "selection": "fashion", "min_ari_selection": 0.9, "trials": [],
             "sensitivity": [{"layer": "blocks.0.attn.qkv", "damage": 0.1, "mask_flips": 0}], "cache": "x.json"}


@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if the calibration of options or the export starts."""
    started = []

    def refuse(*args, **kwargs):
        started.append(args)
        raise AssertionError("the work started before the options were checked")

    monkeypatch.setattr(auto, "resolve_options", refuse)
    monkeypatch.setattr(export_mod, "export_onnx", refuse)
    return started


def _one_line(res, code, *needles):
    assert res.exit_code in (code if isinstance(code, tuple) else (code,)), (res.exit_code, res.output)
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit), res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output


def _export(*args):
    return CliRunner().invoke(export_cli.main, ["--model", "vits14", *[str(a) for a in args]])


@pytest.mark.parametrize("plan,field", [
    ("not json", "not a readable plan"),
    ([1, 2], "not a JSON object"),
    ({k: v for k, v in GOOD_PLAN.items() if k != "keep_fp32"}, "keep_fp32"),
    (GOOD_PLAN | {"keep_fp32": "blocks.0"}, "keep_fp32"),
    (GOOD_PLAN | {"keep_fp32": [3]}, "keep_fp32"),
    (GOOD_PLAN | {"selection": None}, "selection"),
    (GOOD_PLAN | {"min_ari_selection": "high"}, "min_ari_selection"),
    (GOOD_PLAN | {"trials": {}}, "trials"),
    (GOOD_PLAN | {"sensitivity": [{"layer": "x"}]}, "sensitivity"),
])
def test_a_malformed_int8_plan_fails_before_calibration(no_work, tmp_path, plan, field):
    path = tmp_path / "plan.json"
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    res = _export("--quantize", "int8-static", "--int8-plan", path, "-o", tmp_path / "m.onnx")
    _one_line(res, 1, "--int8-plan", field)
    assert not no_work


def test_int8_plan_needs_int8_static(no_work, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(GOOD_PLAN))
    res = _export("--int8-plan", path, "-o", tmp_path / "m.onnx")
    _one_line(res, 2, "--quantize int8-static")
    assert not no_work


def test_a_bad_triton_target_fails_before_the_export(no_work, tmp_path):
    (tmp_path / "file").write_text("x")
    for repo in (tmp_path / "file", tmp_path / "file" / "repo"):
        _one_line(_export("-o", tmp_path / "m.onnx", "--triton", repo), (1, 2), "--triton")
    for out in ("..onnx", "...onnx", ".hidden.onnx", "a b.onnx"):
        res = _export("-o", tmp_path / out, "--triton", tmp_path / "repo")
        _one_line(res, 2, "--triton", "model name")
    # the in-graph variant's name is checked too: 'm' is fine, and so is 'm_image'
    assert not no_work and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", [".", "..", ".x", "a/b", "", "a\\b", "x\n"])
def test_triton_model_names(name):
    with pytest.raises(OptionError, match="model name"):
        check_model_name(name)


def test_a_bad_output_fails_before_the_export(no_work, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.onnx").mkdir()
    _one_line(_export("-o", tmp_path / "file" / "m.onnx"), 1, "--output", "is a file")
    _one_line(_export("-o", tmp_path / "folder.onnx"), (1, 2), "--output", "folder.onnx")
    _one_line(_export("-o", tmp_path / "m.txt"), 2, "--output", ".onnx")
    assert not no_work


@pytest.mark.parametrize("target", ["/proc/m.onnx", "/sys/m.onnx", "/proc/self/new/m.onnx"])
def test_an_output_where_no_file_can_be_created_fails_before_the_weights_load(no_work, target):
    """The permission bits of /proc and /sys let root through: the check creates (and removes) a file."""
    _one_line(_export("-o", target), 1, "--output", "cannot write in")
    assert not no_work


def test_the_write_check_leaves_nothing_behind(tmp_path):
    from itae_export.files import check_writable

    check_writable(tmp_path / "a" / "b.onnx", "--output", folder=False)
    check_writable(tmp_path / "out", "--out", folder=True)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def without_tritonclient(monkeypatch):
    for mod in [m for m in sys.modules if m == "tritonclient" or m.startswith("tritonclient.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # import tritonclient -> ImportError


def test_triton_without_tritonclient(without_tritonclient, tiny_model, tmp_path):
    folder = write_triton_repository(tiny_model, tmp_path / "repo")
    text = (folder / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "embedding" in text and (folder / "1" / "model.onnx").is_file()
    with pytest.raises(MissingDependencyError, match=r"pip install 'tritonclient\[grpc\]'"):
        write_triton_repository(tiny_model, tmp_path / "repo2", check=True)


def test_cli_triton_without_tritonclient(without_tritonclient, tiny_weights, tmp_path):  # noqa: F811
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(export_cli.main, ["--model", "vits14", "--weights", str(tiny_weights), "-o", str(out),
                                               "--no-validate", "--triton", str(tmp_path / "repo")])
    assert res.exit_code == 0, res.output
    assert "tritonclient is not installed" in res.stderr and "pip install" in res.stderr
    assert (tmp_path / "repo" / "m" / "config.pbtxt").is_file()


def test_search_outputs_checked_before_the_index_loads(collection, tmp_path, monkeypatch):
    """itae-search query/serve: a --session or --output that cannot be written fails first."""
    import itae_export.search.index as index_mod
    from itae_export.cli.search import main as search_cli

    def refuse(*a, **k):
        raise AssertionError("the index was loaded before the outputs were checked")

    monkeypatch.setattr(index_mod, "load_index", refuse)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.json").mkdir()
    like = "x.png"
    for args, needle in ((["query", "--session", str(tmp_path / "file" / "s.json")], "--session"),
                         (["query", "-o", str(tmp_path / "file" / "r.csv")], "--output"),
                         (["query", "-o", str(tmp_path / "dir.json")], "-o"),
                         (["serve", "--session", str(tmp_path / "file" / "s.json")], "--session")):
        res = CliRunner().invoke(search_cli, [args[0], str(collection), "--like", like, *args[1:]])
        _one_line(res, (1, 2), needle)


# ------------------------------------------- an empty path is refused by every command, never "."


def _commands():
    """(name, click command, argv prefix) of every itae-* command and subcommand (pyproject's scripts)."""
    import importlib
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    out = []
    for name, target in sorted(scripts.items()):
        mod, attr = target.split(":")
        cmd = getattr(importlib.import_module(mod), attr)
        subs = cmd.commands.items() if isinstance(cmd, click.Group) else [(None, cmd)]
        for sub, c in subs:
            out.append((name if sub is None else f"{name} {sub}", cmd, [] if sub is None else [sub], c))
    return out


def _empty_path_cases():
    cases = []
    for name, root, prefix, cmd in _commands():
        for p in cmd.params:
            if isinstance(p.type, click.Path):
                argv = prefix + ([""] if isinstance(p, click.Argument) else [p.opts[0], ""])
                cases.append(pytest.param(root, argv, p, id=f"{name} {p.human_readable_name}"))
    return cases


def test_every_path_parameter_refuses_an_empty_value():
    from itae_export.cli._common import PathParam

    cases = _empty_path_cases()
    assert len(cases) > 25  # every command's paths, arguments and options
    plain = [c.id for c in cases if not isinstance(c.values[2].type, PathParam)]
    assert not plain, f"click.Path without the empty check: {plain}"


@pytest.mark.parametrize("root,argv,param", _empty_path_cases())
def test_an_empty_path_is_a_usage_error_not_the_current_folder(root, argv, param, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were "" read as ".", this folder would be read or written
    res = CliRunner().invoke(root, argv)
    assert res.exit_code == 2, (argv, res.output)
    assert "an empty path" in res.output and "Traceback" not in res.output, res.output
    assert list(tmp_path.iterdir()) == []
