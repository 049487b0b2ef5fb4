"""A regular (non-editable) install ships conf/ inside the package and runs from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_ships_the_configs_and_runs_from_elsewhere(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("normsweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("config.yaml", "norm/gn.yaml", "model/deep_cnn.yaml", "hydra/default.yaml", "dataset/digits.yaml"):
        assert f"normsweep/conf/{config}" in names
    # The sweeper plugin, inside Hydra's namespace package (no __init__.py of its own there, or it would hide the
    # other Hydra plugins installed, such as the joblib launcher).
    assert "hydra_plugins/normsweep_sweeper/resuming_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the unpacked wheel is importable: not the source checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    code = "import normsweep.config.schema as c, sys; print(c.__file__); print(c.config_dir())"
    where = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    module_file, conf = where.stdout.split()
    assert module_file.startswith(str(site)) and conf == str(site / "normsweep" / "conf")

    run = subprocess.run(
        [sys.executable, "-m", "normsweep", "-m", "epochs=1", "norm=ln,gn", "hydra.sweep.dir=run"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (elsewhere / "run" / "results.csv").is_file() and (elsewhere / "run" / "1" / "summary.json").is_file()
