"""The bandwidth calibration file: a disk full while saving costs the measurement, never a stray file."""

import subprocess
import sys

from tests.cli.helpers import cli_env, limited_file_size


def test_disk_full_while_saving_calibration_leaves_nothing(tmp_path):
    home = tmp_path / "llmrun-home"
    home.mkdir()
    (home / "calibration.json").write_text("{}")
    code = "from llmrun.plan.devices import _save_calibration; _save_calibration({'disk': 'x' * 100000})"
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=120, preexec_fn=limited_file_size(1000))
    assert done.returncode == 0, done.stderr  # calibration is an optimisation: no error
    assert sorted(p.name for p in home.iterdir()) == ["calibration.json"]
    assert (home / "calibration.json").read_text() == "{}"
