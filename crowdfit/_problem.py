"""One region's fitting problem: K sources of one PSF plus a shared background, on one window.

Maps the solver's flat vector of free, unconstrained parameters to the model image, its
Jacobian, the loss and the Gauss–Newton normal equations. Everything here is for one region;
batching is `vmap`'s job.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ._background import n_background_params, render_background
from ._noise import NoiseModel
from ._psf import PSF
from ._transform import to_internal, to_natural

__all__ = ["RegionProblem", "has_profile"]


# Below this many pixels a window's Jacobian is cheaper by automatic differentiation than
# spelled out from profiles, unless the Gauss–Newton matrix is separable too (measured on CPU,
# Poisson noise, one source: 7×7 0.8 vs 1.5 µs, 11×11 3.5 vs 2.9 µs, 16×16 10.8 vs 8.6 µs).
_PROFILE_MIN_PIXELS = 100


# The parameters a `profile` describes (see `PSF`); a PSF with others takes the generic path.
_PROFILE_PARAMS = frozenset({"x", "y", "flux", "sigma", "sigma_x", "sigma_y"})


def has_profile(psf: PSF) -> bool:
    """Whether `psf`'s Jacobian can be spelled out from its 1-D `profile`."""
    return psf.profile is not None and set(psf.params or ("?",)) <= _PROFILE_PARAMS


def _pixel_sum(a):
    # A dot with ones rather than jnp.sum: XLA's CPU reduction of a fused model image over a
    # small window is an order of magnitude slower than the equivalent dot.
    flat = a.reshape(-1)
    return flat @ jnp.ones_like(flat)


@dataclasses.dataclass(frozen=True)
class RegionProblem:
    """Static description of a region fit (hashable, so compiled programs can be cached on it).

    The free vector `u` holds, source by source, the free source parameters in the order of
    `free_names`, then the background's parameters when they are free. `data` is a dict with
    `image`, `mask`, `weight`, `known` (all `(H, W)`; `known` light is added to the model),
    `valid` and `held` `(K,)`, and `fixed`: a dict of the fixed parameters (`(K,)` each, and
    `"background"` `(nb,)` when it is fixed).

    A PSF with a `profile` (the Gaussians: each source is `flux` times an outer product of two
    1-D profiles) has Jacobian columns that are outer products `a ⊗ b` (a sum of two for a
    free shared width), spelled out without automatic differentiation (`_profile_equations`).
    `separable`: besides, the noise is Gaussian and every region's pixel weights are one value
    on a rectangle of rows × columns and zero elsewhere (a window cut by the image edge, not
    one with masked pixels inside); `data` then also holds `rows` `(H,)`, `cols` `(W,)` (1 on
    the rectangle) and `scale` (the weight), and the Gauss–Newton matrix is the elementwise
    product of two small Gram matrices: `O(P² (H + W))` instead of `O(P² H W)`.
    """

    psf: PSF
    names: tuple[str, ...]
    fixed: frozenset
    background: str
    noise: NoiseModel
    n_sources: int
    shape: tuple[int, int]
    separable: bool = False

    @property
    def free_names(self):
        return tuple(n for n in self.names if n not in self.fixed)

    @property
    def n_background(self):
        return n_background_params(self.background)

    @property
    def background_free(self):
        return "background" not in self.fixed

    @property
    def positive_background(self):
        # Poisson counts: a negative constant background would let zero-count pixels pull the
        # model below zero, where the likelihood is undefined.
        return self.noise.name == "poisson" and self.background == "constant"

    def _bg_natural(self, ub):
        return jax.nn.softplus(ub) if self.positive_background else ub

    def _bg_internal(self, b):
        if not self.positive_background:
            return b
        b = jnp.maximum(b, 1e-3)
        return b + jnp.log(-jnp.expm1(-b))

    @property
    def size(self):
        return self.n_sources * len(self.free_names) + self.n_background * self.background_free

    def labels(self):
        """`(name, source index)` for each entry of `u`."""
        out = [(n, k) for k in range(self.n_sources) for n in self.free_names]
        if self.background_free:
            out += [("background", i) for i in range(self.n_background)]
        return tuple(out)

    def grid(self, dtype):
        h, w = self.shape
        x = jnp.arange(w, dtype=dtype)[None, :]
        y = jnp.arange(h, dtype=dtype)[:, None]
        return x, y

    # -- packing ---------------------------------------------------------------------------
    def pack(self, params):
        """Natural parameters (`(K,)` per source name, `"background"` `(nb,)`) to `u` `(P,)`."""
        nf = len(self.free_names)
        src = [to_internal(n, params[n], self.shape) for n in self.free_names]
        parts = [jnp.stack(src, axis=-1).reshape(self.n_sources * nf)] if nf else []
        if self.background_free:
            parts.append(self._bg_internal(jnp.atleast_1d(params["background"])))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,))

    def _split(self, u):
        nf = len(self.free_names)
        src = u[: self.n_sources * nf].reshape(self.n_sources, nf)
        bg = u[self.n_sources * nf :]
        return src, bg

    def natural_derivative(self, u):
        """`(P,)` derivative of each natural parameter with respect to its entry of `u`."""
        src, bg = self._split(u)
        cols = [
            jax.vmap(jax.grad(lambda v, n=n: to_natural(n, v, self.shape)))(src[:, i])
            for i, n in enumerate(self.free_names)
        ]
        d = jnp.stack(cols, axis=-1).reshape(-1) if cols else jnp.zeros((0,), u.dtype)
        d_bg = jax.vmap(jax.grad(self._bg_natural))(bg) if bg.size else bg
        return jnp.concatenate([d, d_bg])

    def unpack(self, u, fixed):
        """`u` and the held parameters to natural parameters (`(K,)` each, background `(nb,)`)."""
        src, bg = self._split(u)
        out = {n: to_natural(n, src[:, i], self.shape) for i, n in enumerate(self.free_names)}
        for n in self.names:
            if n in self.fixed:
                out[n] = fixed[n]
        out["background"] = self._bg_natural(bg) if self.background_free else fixed["background"]
        return out

    # -- model -----------------------------------------------------------------------------
    def _source_image(self, v, held, x, y):
        p = {n: to_natural(n, v[i], self.shape) for i, n in enumerate(self.free_names)}
        p.update(held)
        return jnp.broadcast_to(self.psf(p, x, y), self.shape)

    def model(self, u, data):
        """`(H, W)` model image of the region."""
        src, bg = self._split(u)
        x, y = self.grid(u.dtype)
        held = {n: data["fixed"][n] for n in self.names if n in self.fixed}
        imgs = jax.vmap(self._source_image, in_axes=(0, 0, None, None))(src, held, x, y)
        b = self._bg_natural(bg) if self.background_free else data["fixed"]["background"]
        valid = data["valid"].astype(u.dtype)
        mu = jnp.tensordot(valid, imgs, axes=1) + render_background(self.background, b, x, y)
        return mu + data["known"] if "known" in data else mu

    def model_and_jacobian(self, u, data):
        """Model `(H, W)` and Jacobian `(P, H*W)` of the model with respect to `u`.

        Each source is differentiated only with respect to its own parameters, so the cost grows
        as `K * n` rather than `(K * n)²`.
        """
        src, bg = self._split(u)
        x, y = self.grid(u.dtype)
        held = {n: data["fixed"][n] for n in self.names if n in self.fixed}
        valid = data["valid"].astype(u.dtype)

        def one(v, h):
            f = lambda v: self._source_image(v, h, x, y)
            return f(v), jax.jacfwd(f)(v)

        imgs, jacs = jax.vmap(one)(src, held)  # (K, H, W), (K, H, W, nf)
        imgs = imgs * valid[:, None, None]
        jacs = jacs * valid[:, None, None, None]
        npix = self.shape[0] * self.shape[1]
        j_src = jnp.moveaxis(jacs, 3, 1).reshape(-1, npix)
        bg_img = lambda b: jnp.broadcast_to(render_background(self.background, b, x, y), self.shape)
        if self.background_free:
            bg_img_u = lambda ub: bg_img(self._bg_natural(ub))
            mu = imgs.sum(0) + bg_img_u(bg)
            j_bg = jnp.moveaxis(jax.jacfwd(bg_img_u)(bg), 2, 0).reshape(-1, npix)
            j_src = jnp.concatenate([j_src, j_bg.astype(j_src.dtype)])
        else:
            mu = imgs.sum(0) + bg_img(data["fixed"]["background"])
        if "known" in data:
            mu = mu + data["known"]
        return mu, j_src

    # -- statistics ------------------------------------------------------------------------
    def active(self, data, dtype):
        """`(P,)` 1 for parameters the fit may move, 0 for padded or held sources' parameters."""
        nf = len(self.free_names)
        moving = data["valid"] & ~data["held"] if "held" in data else data["valid"]
        a = jnp.repeat(moving.astype(dtype), nf)
        return jnp.concatenate([a, jnp.ones((self.n_background * self.background_free,), dtype)])

    def damping_floor(self, diag, tiny, flux_floor):
        """`(P,)` the least damping scale of each entry of `u` for Levenberg–Marquardt, from
        the Gauss–Newton diagonal `diag` `(P,)`: `tiny` times the largest diagonal of the same
        parameter across the region's sources (they share units; each background parameter
        on its own), `flux_floor` times it for the fluxes."""
        nf = len(self.free_names)
        n = self.n_sources * nf
        factor = jnp.array([flux_floor if nm == "flux" else tiny for nm in self.free_names])
        per_kind = jnp.max(diag[:n].reshape(self.n_sources, nf), axis=0) * factor
        parts = [jnp.tile(per_kind, self.n_sources)] if nf else []
        return jnp.concatenate([*parts, tiny * diag[n:]]) + tiny

    def loss(self, u, data):
        """Half the χ² (Gaussian) or half the deviance (Poisson) of the region."""
        mu = self.model(u, data)
        return _pixel_sum(data["mask"] * self.noise.loss(mu, data["image"], data["weight"]))

    def normal_equations(self, u, data):
        """Loss, gradient `(P,)` and Gauss–Newton (Fisher) matrix `(P, P)` at `u`."""
        pixels = self.shape[0] * self.shape[1]
        if has_profile(self.psf) and (self.separable or pixels >= _PROFILE_MIN_PIXELS):
            return self._profile_equations(u, data)
        mu, jac = self.model_and_jacobian(u, data)
        d, w, m = data["image"], data["weight"], data["mask"]
        loss = _pixel_sum(m * self.noise.loss(mu, d, w))
        r = (m * self.noise.grad(mu, d, w)).reshape(-1)
        c = (m * self.noise.curvature(mu, d, w)).reshape(-1)
        g = jac @ r
        h = (jac * c[None, :]) @ jac.T
        return loss, g, h

    def _factors(self, u, data):
        """Jacobian columns as sums of outer products: `(A, B, s)` with `A` `(P, R, H)`, `B`
        `(P, R, W)` and `s` `(P,)`, so that column `i` is `s[i] * Σ_r A[i, r] ⊗ B[i, r]`
        (`R = 2` when a shared width `sigma` is free, which moves both profiles; else 1); also
        the model `(H, W)`."""
        src, bg = self._split(u)
        x, y = self.grid(u.dtype)
        x, y = x[0], y[:, 0]
        held = {n: data["fixed"][n] for n in self.names if n in self.fixed}
        nat, dnat = {}, {}
        for i, n in enumerate(self.free_names):
            f = lambda v, n=n: to_natural(n, v, self.shape)
            nat[n], dnat[n] = jax.jvp(f, (src[:, i],), (jnp.ones_like(src[:, i]),))
        p = {**nat, **held}
        sx, sy = self.psf.widths(p)
        valid = data["valid"].astype(u.dtype)
        prof = self.psf.profile

        def factor(d, s):  # (n, K) offsets -> the profile, its derivatives in centre and width
            one = jnp.ones_like(d)
            v, dv = jax.jvp(lambda d: prof(d, s), (d,), (one,))
            _, ds = jax.jvp(lambda s: prof(d, s), (s,), (jnp.ones_like(s),))
            return v.T, -dv.T, ds.T  # (K, n) each

        fx, dfx, sfx = factor(x[:, None] - p["x"][None, :], sx[None, :])
        fy, dfy, sfy = factor(y[:, None] - p["y"][None, :], sy[None, :])
        flux = p["flux"]
        terms = {
            "x": [(fy, dfx)], "y": [(dfy, fx)], "flux": [(fy, fx)],
            "sigma_x": [(fy, sfx)], "sigma_y": [(sfy, fx)], "sigma": [(sfy, fx), (fy, sfx)],
        }  # fmt: skip
        rank = max(len(terms[n]) for n in self.free_names) if self.free_names else 1

        def stacked(side, zero):  # (P_src, R, n)
            if not self.free_names:
                return jnp.zeros((0, rank, zero.shape[-1]), zero.dtype)
            cols = []
            for n in self.free_names:
                t = [pair[side] for pair in terms[n]]
                t += [jnp.zeros_like(zero)] * (rank - len(t))
                cols.append(jnp.stack(t, 1))  # (K, R, n)
            return jnp.stack(cols, 1).reshape(-1, rank, zero.shape[-1])

        a, b = stacked(0, fy), stacked(1, fx)
        scale = {n: (1.0 if n == "flux" else flux) * dnat[n] * valid for n in self.free_names}
        s = (
            jnp.stack([scale[n] for n in self.free_names], 1).reshape(-1)
            if self.free_names
            else jnp.zeros((0,), u.dtype)
        )
        one_y, one_x = jnp.ones_like(y), jnp.ones_like(x)
        if self.background_free:
            b_nat, d_bg = jax.jvp(self._bg_natural, (bg,), (jnp.ones_like(bg),))
            if self.background == "constant":
                a_bg, b_bg = one_y[None], one_x[None]
            else:
                a_bg, b_bg = jnp.stack([one_y, one_y, y]), jnp.stack([one_x, x, one_x])
            pad = lambda t: jnp.concatenate(
                [t[:, None], jnp.zeros((t.shape[0], rank - 1, t.shape[1]), t.dtype)], 1
            )
            a, b = jnp.concatenate([a, pad(a_bg)]), jnp.concatenate([b, pad(b_bg)])
            s = jnp.concatenate([s, d_bg])
        else:
            b_nat = data["fixed"]["background"]
        mu = (fy.T * (flux * valid)[None, :]) @ fx + render_background(
            self.background, b_nat, x[None, :], y[:, None]
        )
        return a, b, s, mu + data["known"] if "known" in data else mu

    def _profile_equations(self, u, data):
        """`normal_equations` for a PSF with a `profile`: the Jacobian's columns are sums of
        outer products of 1-D profiles (`_factors`), with no automatic differentiation over the
        window; for a `separable` problem (see the class) the Gauss–Newton matrix is a product
        of two small Gram matrices, else `Jᵀ C J` with the Jacobian spelled out."""
        a, b, s, mu = self._factors(u, data)
        d, w, m = data["image"], data["weight"], data["mask"]
        loss = _pixel_sum(m * self.noise.loss(mu, d, w))
        e = m * self.noise.grad(mu, d, w)
        g = s * jnp.einsum("prh,prh->p", a, b @ e.T)
        if self.separable:
            gram_a = jnp.einsum("prh,qth->prqt", a * data["rows"][None, None, :], a)
            gram_b = jnp.einsum("prw,qtw->prqt", b * data["cols"][None, None, :], b)
            gram = jnp.einsum("prqt,prqt->pq", gram_a, gram_b)
            return loss, g, data["scale"] * (s[:, None] * s[None, :]) * gram
        c = (m * self.noise.curvature(mu, d, w)).reshape(-1)
        jac = s[:, None] * jnp.einsum("prh,prw->phw", a, b).reshape(s.shape[0], -1)
        return loss, g, (jac * c[None, :]) @ jac.T

    def pearson(self, u, data):
        """Pearson χ²: sum of squared residuals over their expected variance."""
        mu = self.model(u, data)
        d, w, m = data["image"], data["weight"], data["mask"]
        return _pixel_sum(m * self.noise.curvature(mu, d, w) * (d - mu) ** 2)
