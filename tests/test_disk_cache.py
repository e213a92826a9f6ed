"""The disk cache of compiled fit programs (`_disk_cache`): stored, loaded, replaced, skipped."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crowdfit
from crowdfit import _disk_cache, _fit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory, and this process's memory of loaded programs cleared."""
    monkeypatch.setenv("CROWDFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_disk_cache, "_loaded", {})
    return tmp_path


def _counting_program():
    traces = []

    @jax.jit
    def program(a, b):
        traces.append(1)
        return {"sum": a + b, "scaled": (2.0 * a, jnp.sin(b))}

    return program, traces


ARGS = (np.arange(6.0, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32))


def test_a_program_stored_by_one_process_is_loaded_by_the_next(cache, monkeypatch):
    program, traces = _counting_program()
    first = _disk_cache.compiled(program, "test-program", ARGS)(*ARGS)
    assert len(traces) == 1 and len(list(cache.glob("*.bin"))) == 1

    monkeypatch.setattr(_disk_cache, "_loaded", {})  # a new process, as far as the cache knows
    again, traces_again = _counting_program()
    loaded = _disk_cache.compiled(again, "test-program", ARGS)(*ARGS)
    assert traces_again == []  # neither traced nor compiled: loaded
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(first)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(loaded), leaves(first), strict=True):
        np.testing.assert_array_equal(a, b)

    # Other shapes or another name are other programs.
    other = (ARGS[0][:1], ARGS[1][:1])
    _disk_cache.compiled(again, "test-program", other)
    assert len(list(cache.glob("*.bin"))) == 2
    monkeypatch.setattr(_disk_cache, "_loaded", {})
    _disk_cache.compiled(again, "another-program", ARGS)
    assert len(list(cache.glob("*.bin"))) == 3


def test_a_file_that_does_not_load_is_compiled_again_and_replaced(cache, monkeypatch):
    program, _ = _counting_program()
    _disk_cache.compiled(program, "test-program", ARGS)
    (path,) = cache.glob("*.bin")
    path.write_bytes(b"not a program")
    monkeypatch.setattr(_disk_cache, "_loaded", {})
    again, traces = _counting_program()
    out = _disk_cache.compiled(again, "test-program", ARGS)(*ARGS)
    assert len(traces) == 1
    np.testing.assert_array_equal(out["sum"], ARGS[0] + ARGS[1])
    assert path.read_bytes() != b"not a program"


def test_no_file_without_a_name_or_with_the_cache_off(cache, monkeypatch):
    program, traces = _counting_program()
    _disk_cache.compiled(program, None, ARGS)
    assert list(cache.glob("*")) == []
    monkeypatch.setenv("CROWDFIT_CACHE_DIR", "off")
    assert _disk_cache.cache_dir() is None
    monkeypatch.setattr(_disk_cache, "_loaded", {})
    _disk_cache.compiled(program, "test-program", ARGS)
    assert list(cache.glob("*")) == [] and len(traces) == 1  # compiled once, in memory


def test_a_cache_that_cannot_be_written_is_warned_about_once(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("CROWDFIT_CACHE_DIR", str(blocked / "programs"))  # under a file
    monkeypatch.setattr(_disk_cache, "_loaded", {})
    monkeypatch.setattr(_disk_cache, "_warned", [False])
    program, _ = _counting_program()
    with pytest.warns(RuntimeWarning, match="could not write its cache"):
        out = _disk_cache.compiled(program, "test-program", ARGS)(*ARGS)
    np.testing.assert_array_equal(out["sum"], ARGS[0] + ARGS[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _disk_cache.compiled(program, "another-program", ARGS)


def test_fits_of_a_new_process_load_their_programs(cache):
    # End to end: a fit's program stored, then found by a fresh `_program` cache, with the
    # same results and no tracing. (A program that JAX's own compilation cache serves is not
    # stored, see `_disk_cache`; this one's shape, chunks of 3, is this test's alone, and JAX's
    # cache is told not to keep it, so it is compiled here every time.)
    yy, xx = np.mgrid[:9, :9]
    img = 5.0 + 100 * np.exp(-((xx - 4.3) ** 2 + (yy - 3.8) ** 2) / 2)
    init = {"x": [[4.0]], "y": [[4.0]], "flux": [[500.0]], "sigma": [[1.5]], "background": [0.0]}
    minimum = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        first = crowdfit.fit_regions(img[None], init, chunk_size=3)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
    assert len(list(cache.glob("*.bin"))) == 1
    _disk_cache._loaded.clear()
    _fit._program.cache_clear()
    before = _fit._TRACE_COUNT[0]
    again = crowdfit.fit_regions(img[None], init, chunk_size=3)
    assert _fit._TRACE_COUNT[0] == before
    np.testing.assert_array_equal(again.params["x"], first.params["x"])
    np.testing.assert_array_equal(again.errors["flux"], first.errors["flux"])
