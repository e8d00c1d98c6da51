import json

import pytest
from click.testing import CliRunner

from cli_util import one_line_error
from factories import tiny_dense
from flap_deploy.io.checkpoint import validate_checkpoint
from flap_deploy_cli import main


@pytest.fixture(scope="module")
def tiny_dir_no_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "dense"
    tiny_dense("llama").save_pretrained(path)
    return path


def run(*args):
    return CliRunner().invoke(main, ["prune", *map(str, args)])


def test_prune_cli_writes_a_valid_checkpoint_with_provenance_and_report(tiny_dir_no_tok, tmp_path):
    out = tmp_path / "pruned"
    res = run(tiny_dir_no_tok, out, "--ratio", "0.3", "--nsamples", "8", "--seqlen", "16", "--json")
    assert res.exit_code == 0, res.output
    cfg = validate_checkpoint(out)
    flap = cfg["flap"]
    assert flap["method"] == "flap" and flap["structure"] == "AL-AM" and flap["metric"] == "WIFV"
    assert abs(flap["achieved_ratio"] - 0.3) <= 0.005
    assert flap["calibration"]["source"] == "self"
    assert json.loads(res.stdout)["provenance"]["achieved_ratio"] == flap["achieved_ratio"]
    assert (out / "flap_widths.png").is_file() and (out / "flap_report.txt").is_file()


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.0"], "--ratio must be in [0, 1), got 1.0"),
    (["--ratio", "-0.1"], "--ratio must be in [0, 1)"),
    (["--nsamples", "0"], "--nsamples must be a positive integer, got 0"),
    (["--tp-size", "16"], "no non-zero attention width"),
    (["--mlp-multiple", "128"], "no non-zero MLP width"),
    (["--ridge", "-1"], "--ridge must be a number >= 0, got -1.0"),
    (["--no-bias", "--reconstruct", "ls"], "--no-bias conflicts with --reconstruct ls"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny_dir_no_tok, tmp_path, args, message):
    out = tmp_path / "out"
    res = run(tiny_dir_no_tok, out, *args)
    assert message in one_line_error(res)
    assert not out.exists()


def test_no_bias_is_reconstruct_none(tiny_dir_no_tok, tmp_path):
    res = run(tiny_dir_no_tok, tmp_path / "pruned", "--ratio", "0.3", "--nsamples", "8", "--seqlen", "16", "--no-bias",
              "--json")
    assert res.exit_code == 0, res.output
    flap = json.loads(res.stdout)["provenance"]
    assert flap["reconstruction"]["mode"] == "none" and not flap["bias_compensation"]


def test_too_short_calibration_file_is_an_error(tmp_path, bundled_dir):
    path = tmp_path / "dense"
    tiny_dense("llama").save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any real tokenizer; no forward pass happens
        (path / name).write_bytes((bundled_dir / name).read_bytes())
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    out = tmp_path / "out"
    res = run(path, out, "--calib", short, "--seqlen", "128")
    assert "fewer than one window of 128" in one_line_error(res)
    assert not out.exists()


@pytest.mark.slow
def test_tp_size_16_on_the_bundled_model_is_an_error(tmp_path):
    out = tmp_path / "out"
    res = run("smollm2-135m", out, "--tp-size", "16")
    line = one_line_error(res)
    assert "tp_size=16" in line and "9 query heads" in line
    assert not out.exists()
