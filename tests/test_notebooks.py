"""The notebooks' shape: numbered, a parameter cell first whose defaults run offline, and stored
with the outputs of one top-to-bottom run (``notebooks/render.py``), so a repository browser
shows their figures.

The notebooks themselves run under nbval with every ``pytest`` (``--nbval-lax`` in pyproject's
addopts, ``notebooks`` in its testpaths): every cell must run, and cells marked
``# NBVAL_CHECK_OUTPUT`` (deterministic token counts) must print what is stored.

After changing a notebook, render it again:

    .venv/bin/python notebooks/render.py [NN_name ...]
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK = "# NBVAL_CHECK_OUTPUT"
PLOTS = re.compile(r"\bviz\.plot_")
MAX_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 4 * 1024 * 1024
_spec = importlib.util.spec_from_file_location("render", ROOT / "notebooks" / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)


def checked(cell: nbformat.NotebookNode) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(CHECK)


def code_cells(path: Path) -> list[nbformat.NotebookNode]:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 4, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_numbered_with_a_parameter_cell_first(path: Path) -> None:
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)
    first = code_cells(path)[0]
    assert "parameters" in first.metadata.get("tags", [])
    for name in ("MODEL", "PRETRAINED", "DEVICE"):
        assert re.search(rf"^\w*{name}\s*=", first.source, re.M), f"{path.name}: no {name} parameter"
    assert re.search(r'^PRETRAINED\s*=\s*"random"', first.source, re.M), "defaults must run offline (random init)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_with_the_outputs_of_one_run(path: Path) -> None:
    """Every code cell ran once, in order; every cell that plots shows its PNG; no stderr, widget
    views, errors or local paths are stored; checked cells print their counts."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert any(checked(c) for c in cells), f"{path.name} checks no output"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), \
        f"{path.name}: not one top-to-bottom run (notebooks/render.py)"
    for i, cell in enumerate(cells):
        for output in cell.outputs:
            assert output.output_type != "error", f"{path.name} cell {i}"
            assert not (output.output_type == "stream" and output.name == "stderr"), f"{path.name} cell {i}"
            assert render.WIDGET_VIEW not in output.get("data", {}), f"{path.name} cell {i}"
        if checked(cell):
            assert cell.outputs and all(o.output_type == "stream" and o.name == "stdout" for o in cell.outputs)
        if PLOTS.search(cell.source):
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"{path.name} cell {i} shows no figure"
    assert "widgets" not in nb.metadata  # no stored widget state
    assert not render.local_paths(nb)
    assert path.stat().st_size < MAX_BYTES


def test_the_rendered_notebooks_stay_light() -> None:
    assert sum(p.stat().st_size for p in NOTEBOOKS) < MAX_TOTAL_BYTES


def test_nbval_runs_every_notebook() -> None:
    """pytest collects the notebooks (testpaths) and runs them under nbval in lax mode (every
    cell runs; only checked cells compare their stored outputs)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in config["testpaths"] and "--nbval-lax" in config["addopts"].split()
