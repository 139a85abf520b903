"""Run the notebooks top to bottom and store them with their outputs, so that a repository
browser shows every figure and table (nbval still runs every cell in the test suite).

    .venv/bin/python notebooks/render.py                 # every notebook
    .venv/bin/python notebooks/render.py 07_evaluation   # some, by name or path

What is kept: text, tables and PNG figures (re-encoded with a 256-colour palette: about a
quarter of the bytes). What is not: stderr (progress bars), widget views (they need a live
kernel) and widget state, and per-cell timing metadata. A render that would
store an absolute path of this machine fails instead, so nothing local lands in the repository.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

HERE = Path(__file__).resolve().parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
LOCAL_PATH = re.compile(r"(?<![\w.])/(?:home|root|tmp|work|Users|private|var/folders)/")


def palette_png(encoded: str) -> str:
    """A base64 PNG re-encoded with an adaptive 256-colour palette (the smaller of the two)."""
    raw = base64.b64decode(encoded)
    out = io.BytesIO()
    Image.open(io.BytesIO(raw)).convert("RGB").quantize(256).save(out, "PNG", optimize=True)
    return base64.b64encode(min(out.getvalue(), raw, key=len)).decode()


def kept_outputs(outputs: list) -> list:
    """A cell's outputs as stored: no stderr streams, no widget views, palette PNGs."""
    kept = []
    for output in outputs:
        if output.output_type == "stream" and output.name != "stdout":
            continue
        data = output.get("data", {})
        if output.output_type in ("display_data", "execute_result") and WIDGET_VIEW in data:
            continue
        if "image/png" in data:
            data["image/png"] = palette_png(data["image/png"])
        kept.append(output)
    return kept


def store(nb: nbformat.NotebookNode, path: Path) -> int:
    """Write an executed notebook with its kept outputs; returns its size in bytes."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = kept_outputs(cell.outputs)
            cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    leaked = local_paths(nb)
    if leaked:
        raise SystemExit(f"{path.name}: outputs would store local paths ({', '.join(sorted(set(leaked)))}); "
                         "print paths relative to the notebook")
    nbformat.write(nb, path)
    return path.stat().st_size


def local_paths(nb: nbformat.NotebookNode) -> list[str]:
    """Absolute paths of this machine that the notebook's outputs would store."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")] + [v for k, v in output.get("data", {}).items() if k.startswith("text/")]
            found += [m.group(0) for t in texts for m in LOCAL_PATH.finditer(t if isinstance(t, str) else "".join(t))]
    return found


def render(path: Path, timeout: int = 1200) -> int:
    """Execute ``path`` in its folder and store it with its kept outputs; returns its size in bytes."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return store(nb, path)


def notebooks(names: list[str]) -> list[Path]:
    """The notebooks named (a path, a file name or its stem), or all of them."""
    if not names:
        return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    found = []
    for name in names:
        candidates = [Path(name), HERE / name, HERE / f"{name}.ipynb"]
        path = next((p.resolve() for p in candidates if p.is_file()), None)
        if path is None:
            raise SystemExit(f"no notebook {name!r} in {HERE.name}/")
        found.append(path)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to render (default: all)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one cell may run")
    args = parser.parse_args(argv)
    total = 0
    for path in notebooks(args.names):
        size = render(path, args.timeout)
        total += size
        print(f"rendered {path.name}: {size / 1024:.0f} KiB", flush=True)
    print(f"total {total / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())
