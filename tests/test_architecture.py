"""The house's import layers (pyproject.toml [tool.importlinter]) hold, with no cycle anywhere."""

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    report = capsys.readouterr().out
    assert code == 0, report


def test_the_experiments_folder_holds_only_doors_and_the_config_layer():
    top = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
    assert top == ["__init__", "client_app", "config", "flwr_toml", "report", "run", "schema", "server_app",
                   "validation"], top
