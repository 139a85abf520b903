"""The notebooks' shape: numbered, a parameter cell first whose defaults run offline, and no
committed outputs but the small text outputs of the cells nbval checks.

The notebooks themselves run under nbval with every ``pytest`` (``--nbval-lax`` in
pyproject's addopts, ``notebooks`` in its testpaths): every cell must run, and cells marked
``# NBVAL_CHECK_OUTPUT`` (deterministic token counts) must print what is stored.

After changing a notebook, store the checked outputs again (and drop all others) with

    .venv/bin/python tests/test_notebooks.py [notebooks/NN_name.ipynb ...]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CHECK = "# NBVAL_CHECK_OUTPUT"
MAX_BYTES = 64 * 1024


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
def test_only_checked_text_outputs_are_committed(path: Path) -> None:
    cells = code_cells(path)
    assert any(checked(c) for c in cells), f"{path.name} checks no output"
    for cell in cells:
        if not checked(cell):
            assert cell.outputs == [], f"{path.name}: clear the outputs of unchecked cells (see module doc)"
        else:
            assert cell.outputs and all(o.output_type == "stream" and o.name == "stdout" for o in cell.outputs)
    assert "widgets" not in nbformat.read(path, as_version=4).metadata  # no stored widget state
    assert path.stat().st_size < MAX_BYTES


def refresh(path: Path) -> None:
    """Run a notebook top to bottom in its folder; keep only the stdout of checked cells."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            keep = checked(cell)  # nbval wants an execution count on cells with stored outputs
            cell.outputs = [o for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"] if keep else []
            cell.execution_count = cell.execution_count if keep else None
            cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)


if __name__ == "__main__":
    for arg in sys.argv[1:] or NOTEBOOKS:
        refresh(Path(arg))
        print(f"refreshed {arg}")
