"""The package's architecture holds (README "Architecture"): the import-linter contracts in
pyproject.toml (layers, training's allowed imports, no import of data_tools from the library)
and no import cycle between any two modules of ``pipeline``."""

from __future__ import annotations

import grimp

from tests.helpers import ROOT


def test_the_layer_contracts_hold(capsys):
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-4000:]


def test_no_module_imports_itself_back():
    graph = grimp.build_graph("pipeline")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join([module, *back]))
    assert cycles == []


def console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_is_a_console_script_with_help(capsys):
    """Each ``python -m`` entry point of the README is a console script too, and answers --help."""
    import importlib

    import pytest

    scripts = console_scripts()
    modules = {target.split(":")[0] for target in scripts.values()}
    commands = {"pipeline.train", "pipeline.distill", "pipeline.train_autoencoder", "pipeline.sample", "pipeline.evaluate",
                "pipeline.compare", "pipeline.demo_report", "pipeline.edit", "pipeline.evaluate_edits", "data_tools.synth", "data_tools.shard", "data_tools.inspect",
                "data_tools.make_encoders", "data_tools.encode", "data_tools.preview_latents"}
    assert commands <= modules, commands - modules
    for name, target in sorted(scripts.items()):
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and "usage:" in out, name
