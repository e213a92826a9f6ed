"""Run every notebook in `notebooks/` top to bottom, in its small mode; a cell that raises fails.

Each notebook is executed by nbclient in a fresh kernel running this interpreter
(`sys.executable`), with the notebooks folder as the working directory and
`CROWDFIT_NOTEBOOK_SMALL=1`, which every notebook reads to shrink its problem sizes. The kernels
share one on-disk JAX compilation cache (in the system temp folder), so a program compiled by one
notebook, or by an earlier run, is not compiled again.
"""

import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
JAX_CACHE = os.path.join(tempfile.gettempdir(), "crowdfit-jax-cache")
KERNEL = "python3"
TIMEOUT_S = 600  # per notebook (and per cell)


def _quiet_imports():
    """Import the Jupyter machinery, tolerating only its own deprecation notices."""
    with warnings.catch_warnings():
        # jupyter_core warns at import about its coming move to platformdirs paths.
        warnings.filterwarnings(
            "ignore", message=r"Jupyter is migrating its paths", category=DeprecationWarning
        )
        nbformat = pytest.importorskip("nbformat")
        nbclient = pytest.importorskip("nbclient")
        pytest.importorskip("ipykernel")
        from ipykernel.kernelspec import install
        from jupyter_client.kernelspec import KernelSpecManager
    return nbformat, nbclient, install, KernelSpecManager


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A data folder with a `python3` kernelspec whose kernel is this interpreter."""
    *_, install, _ = _quiet_imports()
    prefix = tmp_path_factory.mktemp("jupyter")
    install(prefix=str(prefix), kernel_name=KERNEL)  # writes argv[0] = sys.executable
    return prefix / "share" / "jupyter"


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_saved_without_outputs(path):
    nbformat, *_ = _quiet_imports()
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, jupyter_path, monkeypatch):
    nbformat, nbclient, _, KernelSpecManager = _quiet_imports()
    # The kernel inherits this process's environment. JUPYTER_PATH comes first in the kernelspec
    # search, so "python3" is the kernel of this interpreter, not whatever python is on PATH.
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("CROWDFIT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    assert Path(spec.argv[0]) == Path(sys.executable), spec.argv

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell raised\n{err}", pytrace=False)
