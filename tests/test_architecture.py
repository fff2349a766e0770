"""The house's import layers (pyproject.toml [tool.importlinter]) hold, with no cycle anywhere."""

import logging
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def logging_restored():
    """import-linter's command line reconfigures logging (``dictConfig`` disables every existing
    logger, so later tests would capture no log record); put every logger back as it was."""
    loggers = [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    saved = [(logger, logger.disabled, logger.propagate, logger.level, list(logger.handlers)) for logger in loggers]
    root = (logging.root.level, list(logging.root.handlers))
    yield
    for logger, disabled, propagate, level, handlers in saved:
        logger.disabled, logger.propagate, logger.level, logger.handlers[:] = disabled, propagate, level, handlers
    logging.root.level, logging.root.handlers[:] = root


def test_import_contracts_hold(monkeypatch, capsys, logging_restored):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    report = capsys.readouterr().out
    assert code == 0, report


def test_the_experiments_folder_holds_only_doors_and_the_config_layer():
    top = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
    assert top == ["__init__", "client_app", "config", "flwr_toml", "report", "run", "schema", "server_app",
                   "validation"], top


def test_every_root_the_code_names_is_the_repository():
    import importlib

    modules = ["experiments.claims.eclm", "experiments.claims.cema", "experiments.claims.elastic",
               "experiments.bench.runs", "experiments.flwr_toml"]
    roots = {name: importlib.import_module(name).ROOT for name in modules}
    assert {name: root for name, root in roots.items() if not (root / "pyproject.toml").is_file()} == {}
