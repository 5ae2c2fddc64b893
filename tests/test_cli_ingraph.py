"""itae-export --preprocess-in-graph and --triton DIR through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from itae_export.cli import export as export_cli
from itae_export.cli import validate as validate_cli
from test_cli_export import tiny_weights  # noqa: F401 - the fixture

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")


def test_preprocess_in_graph_and_triton(tiny_weights, tmp_path):  # noqa: F811
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(export_cli.main, ["--model", "vits14", "--weights", str(tiny_weights), "--theta", "2.5",
                                               "--resolution", "56", "-o", str(out), "--preprocess-in-graph", "--triton",
                                               str(tmp_path / "repo")])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines == [str(out), str(tmp_path / "repo" / "m"), str(tmp_path / "repo" / "m_image")]
    manifest = json.loads((tmp_path / "m_image.json").read_text())
    assert manifest["validation"]["passed"] and manifest["validation"]["pixel_mismatch"] == 0
    assert (tmp_path / "repo" / "m_image" / "1" / "model.onnx").is_file()
    assert 'data_type: TYPE_UINT8' in (tmp_path / "repo" / "m_image" / "config.pbtxt").read_text()
    res = CliRunner().invoke(validate_cli.main, [str(tmp_path / "m_image.onnx")])  # itae-validate on it
    assert res.exit_code == 0 and "validation PASSED" in res.output, res.output


def test_preprocess_in_graph_with_int8_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(export_cli.main, ["--model", "vits14", "--preprocess-in-graph", "--quantize", "int8",
                                               "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "--preprocess-in-graph" in res.output and not list(tmp_path.iterdir())
