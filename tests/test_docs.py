"""The docs name every flag the scripts take, and the README stays a ten-minute read."""

import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["gaprune.features.sample", "gaprune.features.fisher", "gaprune.features.gradient",
           "gaprune.model.SparseModel", "gaprune.model.compare", "gaprune.model.evaluate", "gaprune.model.retrain",
           "gaprune.model.export"]


@pytest.mark.parametrize("module", SCRIPTS)
def test_docs_cli_lists_every_flag_of_every_script(module):
    doc = open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8").read()
    section = doc.split(f"### `{module.replace('.', '/')}.py`")[-1].split("\n### ")[0]
    flags = [flag for action in importlib.import_module(module).build_parser()._actions
             for flag in action.option_strings if flag.startswith("--") and flag != "--help"]
    assert flags and [flag for flag in flags if f"`{flag}`" not in section] == []


def test_the_readme_is_short():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) <= 250
