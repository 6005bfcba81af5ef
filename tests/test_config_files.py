"""--config FILE: YAML or JSON defaults that command-line flags override; a run's config.json re-runs the run."""
import json

import pytest

from cli_helpers import assert_one_line_error, rows, run_cli, without_timing

FAST = ("--no-progress", "--util-interval", "5")


def test_yaml_config_with_flag_override_and_rerun_from_config_json(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("policy: edba\nlr: 0.01\ntrain-samples: 40\nepochs: 2\nsubsets: 64\nmilestones: [1, 2]\n"
                   "nesterov: false\n")
    first, again = tmp_path / "first", tmp_path / "again"
    assert run_cli(capsys, "train", "--config", cfg, "--lr", "0.02", "--out", first, *FAST)[0] == 0
    saved = json.loads((first / "config.json").read_text())
    c = saved["config"]
    assert (c["policy"], c["lr"], c["train_samples"], c["policy_options"]["subsets"]) == ("edba", 0.02, 40, 64)
    assert c["milestones"] == [1.0, 2.0] and c["nesterov"] is False  # the file's; the flag won for lr
    assert run_cli(capsys, "train", "--config", first / "config.json", "--out", again, *FAST)[0] == 0
    assert json.loads((again / "config.json").read_text())["config"] == c
    for kind in ("step", "epoch"):
        assert without_timing(rows(first, kind)) == without_timing(rows(again, kind))


def test_json_config(tmp_path, capsys):
    cfg = tmp_path / "exp.json"
    cfg.write_text(json.dumps({"train_samples": 30, "epochs": 1, "batch_size": 10}))
    out = tmp_path / "r"
    assert run_cli(capsys, "train", "--config", cfg, "--out", out, *FAST)[0] == 0
    assert sum(r["batch_size"] for r in rows(out, "step")) == 30


@pytest.mark.parametrize("name, content, needle", [
    ("bad.yaml", "lr: [unclosed", "is not valid YAML"),
    ("bad.json", "{lr: 0.1}", "is not valid JSON"),
    ("list.yaml", "- lr\n- 0.1\n", "holds a list, not a mapping"),
    ("unknown.yaml", "learning_rate: 0.1\n", "unknown option 'learning_rate'"),
    ("typed.yaml", "epochs: three\n", "epochs = 'three' is not a valid value"),
    ("bool.yaml", "nesterov: maybe\n", "nesterov = 'maybe' is not a valid value"),
    ("nan.yaml", "lr: .nan\n", "lr = nan is not a valid value"),
    ("out.yaml", "out: /tmp/x\n", "unknown option 'out'"),
    ("range.yaml", "lr: -1\n", "--lr must be positive"),
    ("policy.yaml", "subsets: 8\n", "--subsets is an option of --policy edba"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, name, content, needle):
    cfg = tmp_path / name
    cfg.write_text(content)
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "train", "--config", cfg, "--out", out, *FAST)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "nope.yaml", *FAST)
    assert rc == 2 and "cannot read --config" in err
