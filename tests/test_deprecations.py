"""normsweep's calls into Hydra and OmegaConf raise no deprecation warning, under Hydra 1.3 / OmegaConf 2.3 and the
1.4 / 2.4 pre-releases alike (normsweep/config/hydra_compat.py): when its modules are imported, when a config is
composed, and in a single run and a sweep run in this process. CI runs these under the pre-releases too."""

from __future__ import annotations

import re
import runpy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import omegaconf
import pytest
from conftest import ROOT, run_cli_here

from normsweep import cli
from normsweep.config import checks, hydra_compat, schema

pytestmark = pytest.mark.deprecations

# Hydra's deprecation_warning() says UserWarning or Hydra1xMigrationWarning, OmegaConf's UserWarning or
# FutureWarning: a deprecation is told by its words, not only by its category.
SAYS_DEPRECATED = re.compile(r"deprecat|will be removed|will (?:become|raise) an error|version_base", re.I)
# Where such a warning is raised on normsweep's behalf: in its own code (a call's stacklevel points there), or
# inside Hydra or OmegaConf (Hydra instantiating the callbacks of normsweep's config).
OURS = tuple(str(ROOT / folder) for folder in ("normsweep", "hydra_plugins", "tests"))
THEIRS = tuple(str(Path(package.__file__).parent) for package in (hydra, omegaconf))


@contextmanager
def no_deprecations() -> Iterator[None]:
    """Fail if the block raises a deprecation warning from or through Hydra or OmegaConf."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # also one already shown once from the same line
        yield
    found = [
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"
        for w in caught
        if w.filename.startswith(OURS + THEIRS)
        and (
            issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
            or w.category.__name__.endswith("MigrationWarning")
            or SAYS_DEPRECATED.search(str(w.message))
        )
    ]
    assert not found, "\n".join(found)


def test_importing_normsweep_raises_no_deprecation_warning() -> None:
    # What an import does (registering the resolver and the schemas, @hydra.main), run again in copies of the
    # modules: the modules themselves were imported before any test, where a warning fails no test.
    try:
        with no_deprecations():
            runpy.run_path(schema.__file__, run_name="_schema_again")
            runpy.run_path(cli.__file__, run_name="_cli_again")
    finally:
        hydra_compat.register_resolver("normsweep.new_dir", schema.new_dir, use_cache=True)  # the module's own


def test_composing_a_config_raises_no_deprecation_warning(compose_cfg) -> None:
    with no_deprecations():
        run = checks.compose_run(["norm=gn", "epochs=1"])
        cfg = compose_cfg(["norm=bn", "hydra.sweep.dir=s"], return_hydra_config=True)
    assert run.norm.name == "gn" and cfg.norm.name == "bn"


TINY = ["model=mlp", "batch_size=256", "epochs=1"]


def test_a_run_and_a_sweep_raise_no_deprecation_warning(tmp_path: Path) -> None:
    with no_deprecations():
        single = run_cli_here([*TINY, "hydra.run.dir=r"], tmp_path)
        sweep = run_cli_here(["-m", *TINY, "norm=bn", "hydra.sweep.dir=s"], tmp_path)
    assert single.returncode == 0, single.stdout + single.stderr
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert (tmp_path / "r" / "summary.json").is_file() and (tmp_path / "s" / "results.csv").is_file()
