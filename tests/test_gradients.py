"""Gradients through `fit_regions`: implicit differentiation against finite differences of refits.

Every check shares a few compiled programs (one batch of single spots, overlapping pairs, padded
and held sources, masked pixels and an empty region), so the module compiles a handful of times.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crowdfit
from crowdfit._implicit import implicit_optimum, loss_hessian
from crowdfit._noise import get_noise
from crowdfit._problem import RegionProblem
from crowdfit._psf import get_psf

SHAPE = (10, 10)
SIGMA = 1.2
BACKGROUND = 20.0
FIT = dict(psf="gaussian", fixed=("sigma", "background"), tol=1e-12, max_iter=100)
N_SPOTS, N_PAIRS = 3, 5
EMPTY = N_SPOTS + N_PAIRS  # a region with no pixels: nothing constrains its two sources
HELD = (5, 1)  # a source held at its starting values: in the model, never moved
OUTPUTS = ("x", "y", "flux")
TANGENTS = ("images", "weights", "sigma", "background", "init")


@pytest.fixture(scope="module", autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def case():
    """9 regions of 2 source slots: 3 single spots (the second slot padded), 5 overlapping pairs
    (one with a held source), and an empty region; masked pixels everywhere, NaNs under the mask
    of region 0. Sigma and the background are held (`fixed`) and differentiated."""
    common = dict(shape=SHAPE, psf="gaussian", sigma=SIGMA, background=BACKGROUND, noise="poisson")
    spots, ts = crowdfit.simulate_spots(N_SPOTS, flux=2000.0, jitter=1.0, seed=1, **common)
    pairs, tp = crowdfit.simulate_pairs(
        N_PAIRS, 2.2, flux="lognormal", jitter=0.5, seed=2, **common
    )
    images = np.concatenate([spots, pairs, np.full((1, *SHAPE), BACKGROUND)])
    x = np.concatenate([np.stack([ts["x"], ts["x"]], 1), tp["x"], [[3.0, 6.0]]])
    y = np.concatenate([np.stack([ts["y"], ts["y"]], 1), tp["y"], [[4.0, 5.0]]])
    flux = np.concatenate([np.stack([ts["flux"], ts["flux"]], 1), tp["flux"], [[800.0, 900.0]]])
    valid = np.ones(x.shape, bool)
    valid[:N_SPOTS, 1] = False
    held = np.zeros(x.shape, bool)
    held[HELD] = True
    mask = np.ones(images.shape, bool)
    mask[:, 0, :2] = False
    mask[:, 7, 9] = False
    mask[EMPTY] = False
    images[0, 0, :2] = np.nan
    weights = 1.0 / (np.nan_to_num(images) + 5.0)
    rng = np.random.default_rng(3)
    jitter = np.where(held, 0.0, 1.0)
    init = dict(
        x=x + jitter * rng.uniform(-0.3, 0.3, x.shape),
        y=y + jitter * rng.uniform(-0.3, 0.3, x.shape),
        flux=flux * np.where(held, 1.0, 0.8),
    )
    return dict(
        images=jnp.asarray(images),
        weights=jnp.asarray(weights),
        sigma=jnp.asarray(np.float64(SIGMA)),
        background=jnp.asarray(np.full(len(images), BACKGROUND)),
        init={k: jnp.asarray(v) for k, v in init.items()},
        mask=mask,
        valid=valid,
        held=held,
        active=valid & ~held,
    )


def _args(case):
    return tuple(case[k] for k in TANGENTS)


def _fit(case, images, weights, sigma, background, init, **kw):
    init = {**init, "sigma": sigma, "background": background}
    return crowdfit.fit_regions(
        images,
        init,
        mask=case["mask"],
        valid=case["valid"],
        held=case["held"],
        weights=weights,
        **{**FIT, **kw},
    )


def _outputs(res):
    return {**{n: res.params[n] for n in OUTPUTS}, "loss": res.loss}


@pytest.fixture(scope="module")
def jvp_fn(case):
    """`(outputs, tangents of the outputs, status)` of the fit at `primals` along `tangents`."""

    def outputs(*args):
        res = _fit(case, *args)
        return _outputs(res), res.status

    return jax.jit(lambda p, t: jax.jvp(outputs, p, t, has_aux=True))


@pytest.fixture(scope="module")
def fitted(case, jvp_fn):
    zero = jax.tree_util.tree_map(jnp.zeros_like, _args(case))
    out, _, status = jvp_fn(_args(case), zero)
    status = np.asarray(status)
    assert np.all(status[:EMPTY] == crowdfit.Status.CONVERGED), status
    assert status[EMPTY] == crowdfit.Status.SINGULAR
    return out


@pytest.fixture(scope="module")
def grad_fn(case):
    """Gradient of `<cotangent, outputs>` with respect to every argument of the fit."""

    def scalar(cotangent, *args):
        out = _outputs(_fit(case, *args))
        return sum(jnp.sum(cotangent[k] * out[k]) for k in out)

    return jax.jit(jax.grad(scalar, argnums=(1, 2, 3, 4, 5)))


def _tangents(case, which, seed=0):
    rng = np.random.default_rng(seed)
    tangent = list(jax.tree_util.tree_map(jnp.zeros_like, _args(case)))
    i = TANGENTS.index(which)
    if which == "init":
        scale = dict(x=0.1, y=0.1, flux=20.0)
        tangent[i] = {
            n: jnp.asarray(scale[n] * rng.standard_normal(v.shape)) for n, v in case[which].items()
        }
    else:
        scale = 0.05 * np.asarray(case["weights"]) if which == "weights" else 1.0
        tangent[i] = jnp.asarray(rng.standard_normal(np.shape(case[which])) * scale)
    return tuple(tangent)


def _central_difference(case, jvp_fn, tangent, eps):
    """Fourth-order central difference of the refitted outputs along `tangent`: its truncation
    error is small at steps large enough that the refits' own convergence noise does not matter.
    The refits run through `jvp_fn` with a zero tangent, so they need no program of their own."""
    zero = jax.tree_util.tree_map(jnp.zeros_like, tangent)

    def at(h):
        shifted = jax.tree_util.tree_map(lambda a, t: a + h * t, _args(case), tangent)
        return {k: np.asarray(v) for k, v in jvp_fn(shifted, zero)[0].items()}

    f1, f_1, f2, f_2 = at(eps), at(-eps), at(2 * eps), at(-2 * eps)
    return {k: (8 * (f1[k] - f_1[k]) - (f2[k] - f_2[k])) / (12 * eps) for k in f1}


def _assert_close(got, want, rtol):
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        scale = np.max(np.abs(w))
        assert scale > 0, k
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=k)


def _cotangent(fitted, **ones):
    out = {k: jnp.zeros_like(v) for k, v in fitted.items()}
    for k, v in ones.items():
        out[k] = jnp.ones_like(out[k]) if v is None else out[k].at[v].set(1.0)
    return out


def _inner(a, b):
    leaves = jax.tree_util.tree_leaves
    return sum(float(jnp.sum(x * y)) for x, y in zip(leaves(a), leaves(b), strict=True))


@pytest.mark.parametrize(
    "which, eps",
    [("images", 0.5), ("weights", 0.5), ("sigma", 1e-2), ("background", 0.5), ("init", 0.5)],
)
def test_jvp_matches_finite_differences(case, fitted, jvp_fn, which, eps):
    tangent = _tangents(case, which)
    _, tangent_out, _ = jvp_fn(_args(case), tangent)
    fd = _central_difference(case, jvp_fn, tangent, eps)
    # The empty region is singular: it gets a zero derivative even where its refits (stuck at
    # their start) follow the starting values.
    _assert_close(*({k: v[:EMPTY] for k, v in d.items()} for d in (tangent_out, fd)), rtol=1e-4)
    for k in OUTPUTS:
        t = np.asarray(tangent_out[k])
        assert np.all(t[EMPTY] == 0.0)
        t, active = t[:EMPTY], case["active"][:EMPTY]
        if which == "init":
            # The optimum forgets where it started, but not the held source it fits around; the
            # padded and held slots return their starting values.
            moved = active.copy()
            moved[HELD[0]] = False
            assert np.all(t[moved] == 0.0)
            assert np.all(t[HELD[0]] != 0.0)
            np.testing.assert_allclose(t[~active], tangent[-1][k][:EMPTY][~active])
        else:
            # Padded and held slots do not move: an exact zero.
            assert np.all(t[~active] == 0.0) and np.all(t[active] != 0.0)


def test_pixel_gradients_match_finite_differences(case, fitted, jvp_fn, grad_fn):
    # One flux and one position, of a single spot and of sources in pairs, pixel by pixel.
    for region, source, name in [(1, 0, "flux"), (4, 1, "x"), (5, 0, "y")]:
        cotangent = _cotangent(fitted, **{name: (region, source)})
        g_images = np.asarray(grad_fn(cotangent, *_args(case))[0])
        assert np.all(np.isfinite(g_images))
        # Only the region's own unmasked pixels matter.
        assert np.all(np.delete(g_images, region, axis=0) == 0.0)
        assert np.all(g_images[region][~case["mask"][region]] == 0.0)
        for r, c in [(4, 4), (5, 6), (2, 7)]:
            tangent = list(jax.tree_util.tree_map(jnp.zeros_like, _args(case)))
            tangent[0] = tangent[0].at[region, r, c].set(1.0)
            fd = _central_difference(case, jvp_fn, tuple(tangent), 1.0)[name][region, source]
            assert g_images[region, r, c] == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_jvp_and_vjp_agree(case, fitted, jvp_fn, grad_fn):
    rng = np.random.default_rng(7)
    outputs = fitted
    cotangent = {k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in outputs.items()}
    grads = grad_fn(cotangent, *_args(case))
    for i, which in enumerate(TANGENTS):
        tangent = _tangents(case, which, seed=i)
        _, tangent_out, _ = jvp_fn(_args(case), tangent)
        forward = _inner(cotangent, tangent_out)
        reverse = _inner(grads[i], tangent[i])
        assert np.isfinite(reverse)
        assert reverse == pytest.approx(forward, rel=1e-7), which


def test_gradient_with_respect_to_free_starting_values_is_zero(case, fitted, grad_fn):
    cotangent = _cotangent(fitted, x=None, y=None, flux=None, loss=None)
    grads = grad_fn(cotangent, *_args(case))
    active = case["active"]
    for name, g in grads[-1].items():
        g = np.asarray(g)
        assert np.all(g[active] == 0.0), name
        # Padded and held slots return their starting values, which the fit goes around.
        assert np.all(g[~active] != 0.0), name
    for g in grads[:-1]:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.any(np.asarray(g) != 0.0)


def test_vmap_of_gradient_equals_a_loop(case, fitted, grad_fn):
    cotangent = _cotangent(fitted, x=None, flux=None)
    sigmas = jnp.asarray([1.1, 1.2, 1.3])
    images, weights, _, background, init = _args(case)

    def grad_sigma(sigma):
        return grad_fn(cotangent, images, weights, sigma, background, init)[2]

    batched = np.asarray(jax.jit(jax.vmap(grad_sigma))(sigmas))
    looped = np.asarray([grad_sigma(s) for s in sigmas])
    np.testing.assert_allclose(batched, looped, rtol=1e-10)
    assert np.all(np.isfinite(looped)) and len(set(looped.tolist())) == 3


def test_failed_regions_get_zero_gradient_not_nan(case, fitted):
    # Restart the first regions at their optimum (they converge at once) and the others far
    # away, with too few iterations to get there; one starts from NaN, and the empty region is
    # singular. The gradient of a sum over the batch (of fluxes and of their uncertainties) is
    # finite, and zero for every failed region.
    converged, nan_start = 4, 7
    start = {
        n: jnp.concatenate([fitted[n][:converged], 0.7 * case["init"][n][converged:]])
        for n in OUTPUTS
    }
    start["x"] = start["x"].at[nan_start, 0].set(jnp.nan)
    images, weights, _, background, _ = _args(case)

    def total(images, sigma):
        res = _fit(case, images, weights, sigma, background, start, max_iter=3)
        keep = case["active"] & res.converged[:, None]
        flux = jnp.where(keep, res.params["flux"], 0.0)
        error = jnp.where(keep, res.errors["flux"], 0.0)
        return jnp.sum(flux) + jnp.sum(error), res.status

    value_and_grad = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))
    (value, status), (g_images, g_sigma) = value_and_grad(images, case["sigma"])
    want = np.full(EMPTY + 1, crowdfit.Status.MAX_ITERATIONS)
    want[:converged] = crowdfit.Status.CONVERGED
    want[nan_start] = crowdfit.Status.NOT_FINITE
    want[EMPTY] = crowdfit.Status.SINGULAR
    np.testing.assert_array_equal(np.asarray(status), want)
    assert np.isfinite(float(value))
    assert np.isfinite(float(g_sigma)) and float(g_sigma) != 0.0
    g_images = np.asarray(g_images)
    assert np.all(np.isfinite(g_images))
    assert np.all(g_images[converged:] == 0.0)
    assert np.all(np.any(g_images[:converged] != 0.0, axis=(1, 2)))


def test_unroll_agrees_with_implicit(case, fitted, jvp_fn):
    # Differentiating through every step of a converged fit gives the implicit derivative.
    def unrolled(*args):
        return _outputs(_fit(case, *args, adjoint="unroll"))

    tangents = [_tangents(case, w) for w in TANGENTS]
    tangent = jax.tree_util.tree_map(lambda *t: sum(t), *tangents)
    out, tangent_out = jax.jit(lambda p, t: jax.jvp(unrolled, p, t))(_args(case), tangent)
    want_out, want, _ = jvp_fn(_args(case), tangent)
    for k in want:
        np.testing.assert_allclose(out[k], want_out[k], rtol=1e-9, err_msg=k)
    # Not the empty region: it failed, so its implicit derivative is zero, while unrolling
    # passes its starting values through.
    _assert_close(*({k: v[:EMPTY] for k, v in d.items()} for d in (tangent_out, want)), rtol=1e-5)


def test_hessian_and_implicit_derivative_are_exact():
    # Away from any optimum, with residuals large enough that the Hessian's second-order term
    # matters: the hand-assembled Hessian is jax.hessian's, and the implicit derivative is the
    # dense solve of the implicit function theorem, in both modes. Elliptical sources with a
    # held width, a held source and a padded one, a plane and Poisson noise: P = 15 takes the
    # looped Cholesky.
    names = ("x", "y", "flux", "sigma_x", "sigma_y")
    k, shape = 3, (12, 12)
    problem = RegionProblem(
        get_psf("elliptical_gaussian"),
        names,
        frozenset({"sigma_y"}),
        "plane",
        get_noise("poisson"),
        k,
        shape,
    )
    rng = np.random.default_rng(11)
    truth = {
        "x": jnp.asarray([3.0, 8.5, 5.0]),
        "y": jnp.asarray([3.5, 4.0, 8.5]),
        "flux": jnp.full(k, 900.0),
        "sigma_x": jnp.full(k, 1.2),
        "background": jnp.asarray([10.0, 0.2, -0.3]),
    }
    data = dict(
        image=jnp.zeros(shape),
        mask=jnp.ones(shape).at[0, :3].set(0.0),
        weight=jnp.asarray(rng.uniform(0.5, 1.5, shape)),
        valid=jnp.asarray([True, True, False]),
        held=jnp.asarray([False, True, False]),
        fixed={"sigma_y": jnp.full(k, 1.6)},
    )
    u = problem.pack(truth)
    data["image"] = problem.model(u, data) + jnp.asarray(rng.normal(0.0, 3.0, shape))
    u = u + jnp.asarray(rng.normal(0.0, 0.02, u.shape))
    float0 = lambda a: np.zeros(np.shape(a), jax.dtypes.float0)
    normal = lambda a: jnp.asarray(rng.normal(size=a.shape))
    t_data = jax.tree_util.tree_map(lambda a: float0(a) if a.dtype == bool else normal(a), data)
    t_u0 = normal(u)
    cotangent = normal(u)
    active = np.asarray(problem.active(data, u.dtype))
    assert active.sum() == 4 + 3  # one free source and the plane

    @jax.jit
    def compute(data):
        f = lambda u0, d: implicit_optimum(problem)(u, u0, d, jnp.asarray(True))
        grad_u = lambda u, d: jax.grad(problem.loss)(u, d)
        return dict(
            hand=loss_hessian(problem, u, data),
            auto=jax.hessian(problem.loss)(u, data),
            dg=jax.jvp(grad_u, (u, data), (t_u0 * (1.0 - active), t_data))[1],
            du=jax.jvp(f, (u, data), (t_u0, t_data))[1],
            vjp=jax.vjp(f, u, data)[1](cotangent),
        )

    out = compute(data)
    auto = out["auto"]
    np.testing.assert_allclose(out["hand"], auto, rtol=1e-10, atol=1e-10 * np.abs(auto).max())

    dense = np.where(np.outer(active, active) > 0, auto, np.diag(1.0 - active))
    assert np.all(np.linalg.eigvalsh(dense) > 0)
    want = -np.linalg.solve(dense, out["dg"] * active) * active + t_u0 * (1.0 - active)
    assert np.all(np.abs(want) > 0)
    np.testing.assert_allclose(out["du"], want, rtol=1e-8, atol=1e-10 * np.abs(want).max())

    ct_u0, ct_data = out["vjp"]
    ct_data, t_data = (
        {n: d[n] for n in ("image", "mask", "weight", "fixed")} for d in (ct_data, t_data)
    )
    reverse = _inner(ct_u0, t_u0) + _inner(ct_data, t_data)
    assert reverse == pytest.approx(float(cotangent @ out["du"]), rel=1e-9)
