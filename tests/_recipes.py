"""The recipes in python/ and the scripts in bench/ (scripts, not a package) for the tests.

``load(name)``: a fresh module from ``python/<name>.py`` (python/ on ``sys.path`` while it runs,
as when the script is run). ``load_bench(name)``: a fresh module from ``bench/<name>.py``,
registered under its name in ``sys.modules`` (dataclasses look their module up there). ``GPT``, ``GPTConfig``: the recipe model of ``python/_gpt.py``,
imported as the module ``_gpt`` (the name the recipes import it under, so they share it).
"""
import importlib
import importlib.util
import pathlib
import sys

PYTHON = pathlib.Path(__file__).resolve().parents[1] / "python"
BENCH = PYTHON.parent / "bench"


def _on_path(fn):
    sys.path.insert(0, str(PYTHON))
    try:
        return fn()
    finally:
        sys.path.remove(str(PYTHON))


def load(name):
    def run():
        spec = importlib.util.spec_from_file_location(name, PYTHON / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return _on_path(run)


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


_gpt = _on_path(lambda: importlib.import_module("_gpt"))
GPT, GPTConfig = _gpt.GPT, _gpt.GPTConfig
