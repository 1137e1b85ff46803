"""The notebooks in notebooks/: each `.ipynb` is in sync with its jupytext `.py` (same
cells), and runs top to bottom in a fresh kernel of this environment, writing every PNG
its source names into `$JAXSERVE_NOTEBOOK_FIGURES` and showing figures inline."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(path.stem for path in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
_CHECK_KERNEL = "import sys\nprint(sys.prefix)"


def cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def figure_names(source: str) -> set[str]:
    """The PNG files a notebook's source names: `save_figure(fig, "name")` or a `"name.png"`."""
    return ({f"{name}.png" for name in re.findall(r'save_figure\(\s*\w+\s*,\s*"([\w.-]+)"\s*\)', source)}
            | set(re.findall(r'"([\w.-]+\.png)"', source)))


def kernel_env(figures: Path) -> dict[str, str]:
    """The test process's environment for the kernel, without what the test suite adds for
    itself (virtual CPU devices) or what would hide inline figures (a forced backend)."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env.update(XLA_FLAGS=flags, JAXSERVE_NOTEBOOK_FIGURES=str(figures))
    return env


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_paired_and_runs(name, tmp_path):
    py, ipynb = NOTEBOOK_DIR / f"{name}.py", NOTEBOOK_DIR / f"{name}.ipynb"
    assert py.exists(), f"{ipynb.name} has no paired {py.name}; run `jupytext --sync {ipynb}`"
    paired = jupytext.read(py)
    notebook = jupytext.read(ipynb)
    assert paired.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert cells(paired) == cells(notebook), f"{py.name} and {ipynb.name} differ; run `jupytext --sync {py}`"

    # run the .ipynb as it is in the repository, plus a last cell that says which Python ran it
    notebook = nbformat.read(ipynb, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(_CHECK_KERNEL))
    figures = tmp_path / "figures"
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.monotonic()
    client.execute(env=kernel_env(figures))
    print(f"{name}: executed in {time.monotonic() - start:.1f} s")

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert notebook.cells[-1].outputs[0]["text"].strip() == sys.prefix, "the kernel ran another Python"
    assert not [o for o in outputs if o.output_type == "error"]
    expected = figure_names(py.read_text())
    for png in expected:
        data = (figures / png).read_bytes()
        assert data.startswith(b"\x89PNG"), png
    if expected:
        assert any("image/png" in output.get("data", {}) for output in outputs), "no figure shown inline"
