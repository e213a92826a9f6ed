"""Compiled fit programs kept on disk, so that a new process neither traces nor compiles them.

A fit program is traced, lowered and compiled the first time a process meets its region shape:
1–1.5 s a program with JAX's own compilation cache warm (which skips only XLA's compile), 4–5 s
without; a `fit_image` call meets a few to a dozen shapes. `compiled` keeps the compiled
executable itself (`jax.experimental.serialize_executable`), about 0.7 MB a program, and a later
process loads it in about 0.15 s.

Where: `$CROWDFIT_CACHE_DIR`, else `$XDG_CACHE_HOME/crowdfit/programs` (`~/.cache/...`).
`CROWDFIT_CACHE_DIR=off` turns it off. Only on a CPU, and only for programs with a stable
name (built-in PSF and noise models; see `_fit._program_name`). A file is found by a hash of
the program's name, its arguments' shapes and dtypes, and everything that could make an old
executable wrong or unloadable here: crowdfit's source, the jax and jaxlib versions, the
backend, the CPU's features, `XLA_FLAGS` and float64 mode. A loaded program is run once on
its first arguments; a file that does not load or run is deleted and the program compiled
again. A program that JAX's own compilation cache served (when `jax_compilation_cache_dir` is
set) is not stored: serialized again, such an executable lacks its compiled functions. A cache
that cannot be written is warned about once and skipped. The newest `_MAX_FILES` files are
kept. The files are pickles: the directory must be the user's own, like any cache of code.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import pickle
import tempfile
import threading
import warnings

import jax
import jaxlib
from jax.experimental import serialize_executable

__all__ = ["compiled"]

_MAX_FILES = 256
_OFF = ("", "0", "off", "false", "no", "none")

_from_jax_cache = threading.local()  # .hit: this thread's last compile was a JAX cache hit


def _note_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _from_jax_cache.hit = True


jax.monitoring.register_event_listener(_note_cache_hit)

_loaded: dict = {}  # (program, signature) -> jax.stages.Compiled, for this process
_locks: dict = {}
_guard = threading.Lock()
_warned = [False]


def cache_dir() -> pathlib.Path | None:
    """The directory of the program cache, or `None` when it is turned off."""
    given = os.environ.get("CROWDFIT_CACHE_DIR")
    if given is not None:
        return None if given.strip().lower() in _OFF else pathlib.Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "crowdfit" / "programs"


@functools.cache
def _fingerprint() -> str:
    """What an executable compiled here depends on beyond its own program."""
    h = hashlib.sha256()
    package = pathlib.Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode())
        h.update(path.read_bytes())
    client = jax.devices()[0].client
    h.update(f"{jax.__version__} {jaxlib.__version__}".encode())
    h.update(f"{client.platform} {client.platform_version}".encode())
    h.update(" ".join(sorted({d.device_kind for d in jax.devices()})).encode())
    h.update(os.environ.get("XLA_FLAGS", "").encode())
    try:  # the CPU's features: XLA compiles for the host's instruction set
        with open("/proc/cpuinfo") as f:
            h.update(next((ln for ln in f if ln.startswith(("flags", "Features"))), "").encode())
    except OSError:
        import platform

        h.update(platform.processor().encode())
    return h.hexdigest()


def _signature(args) -> tuple:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return (str(tree), tuple((tuple(a.shape), str(a.dtype)) for a in leaves))


def compiled(program, name: str | None, args):
    """`program` (a `jax.jit` function) compiled for `args`, from this process's memory, from
    the disk cache, or compiled now (and stored there).

    `name`: a description of `program` that is the same in every process (its static
    settings), or `None` to keep it in memory only. `args`: concrete arrays (numpy), of the
    shapes and dtypes the executable will be called with.
    """
    key = (program, _signature(args))
    with _guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # two threads meeting one new program compile it once
        if key not in _loaded:
            _loaded[key] = _load_or_compile(program, name, args, key[1])
    return _loaded[key]


def _load_or_compile(program, name, args, signature):
    where = cache_dir() if name is not None and jax.default_backend() == "cpu" else None
    if where is None:
        return program.lower(*args).compile()
    x64 = bool(jax.config.jax_enable_x64)
    digest = hashlib.sha256(repr((name, signature, x64, _fingerprint())).encode()).hexdigest()
    path = where / f"{digest[:40]}.bin"
    if path.exists():
        try:
            blob, in_tree, out_tree = pickle.loads(path.read_bytes())
            exe = serialize_executable.deserialize_and_load(
                blob, jax.tree_util.tree_structure(in_tree), jax.tree_util.tree_structure(out_tree)
            )
            jax.block_until_ready(exe(*args))  # it runs here (else it is compiled again)
            return exe
        except Exception:  # an unreadable or stale file: compile again and replace it
            path.unlink(missing_ok=True)
    _from_jax_cache.hit = False
    exe = program.lower(*args).compile()
    if _from_jax_cache.hit:
        # Loaded from JAX's own compilation cache: such an executable, serialized again, lacks
        # its compiled functions (calls fail with "Function ... not found"). Not stored.
        return exe
    try:
        blob, in_tree, out_tree = serialize_executable.serialize(exe)
    except (ValueError, NotImplementedError):  # this program cannot be serialized
        return exe
    # Pytree structures are stored as trees of zeros (a structure is rebuilt from one).
    shells = [jax.tree_util.tree_unflatten(t, [0] * t.num_leaves) for t in (in_tree, out_tree)]
    _store(where, path, pickle.dumps((blob, *shells)))
    return exe


def _store(where: pathlib.Path, path: pathlib.Path, data: bytes) -> None:
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: another process never reads half a file
        files = sorted(where.glob("*.bin"), key=lambda p: p.stat().st_mtime)
        for old in files[:-_MAX_FILES]:
            old.unlink(missing_ok=True)
    except OSError as e:
        if not _warned[0]:
            _warned[0] = True
            warnings.warn(
                f"crowdfit could not write its cache of compiled programs at {where} ({e}); "
                "each new process compiles them again. Set CROWDFIT_CACHE_DIR to a writable "
                "directory, or to 'off'.",
                RuntimeWarning,
                stacklevel=4,
            )
