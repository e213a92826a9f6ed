"""Reading images from disk (FITS here; NumPy and TIFF in the CLI tests) and sky coordinates."""

import numpy as np
import pytest

import crowdfit
from crowdfit._cli import main as cli_main

fits = pytest.importorskip("astropy.io.fits")
WCS = pytest.importorskip("astropy.wcs").WCS


def _wcs(angle=0.3, scale=0.5 / 3600):
    """A tangent-plane WCS, rotated by `angle`, `scale` degrees per pixel."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.2]
    w.wcs.crpix = [200.5, 100.5]
    c, s = np.cos(angle), np.sin(angle)
    w.wcs.cd = scale * np.array([[-c, s], [s, c]])
    return w


@pytest.fixture(scope="module")
def field():
    return crowdfit.simulate_field((200, 400), 50, seed=4)  # (the CLI tests' field: one compile)


def test_fits_image_is_read_in_native_byte_order(tmp_path, field):
    image = field[0].astype(np.float32)
    path = tmp_path / "field.fits"
    fits.PrimaryHDU(image).writeto(path)  # (stored big-endian)
    read = crowdfit.read_image(path, mmap=False)
    assert read.dtype == np.float32 and read.dtype.isnative
    np.testing.assert_array_equal(read, image)
    np.testing.assert_array_equal(crowdfit.read_image(path), image)  # memory-mapped
    assert crowdfit.read_header(path)["NAXIS1"] == 400
    assert crowdfit.read_header(tmp_path / "x.npy") is None  # not FITS: no header


def test_compressed_fits(tmp_path):
    image = np.random.default_rng(0).normal(100, 5, (32, 40)).astype(np.float32)
    fits.PrimaryHDU(image).writeto(tmp_path / "a.fits.gz")
    np.testing.assert_array_equal(crowdfit.read_image(tmp_path / "a.fits.gz"), image)
    tiled = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(image, quantize_level=-0.01)])
    tiled.writeto(tmp_path / "a.fits.fz")  # (quantized to 0.01: lossy by design)
    read = crowdfit.read_image(tmp_path / "a.fits.fz", mmap=False)
    assert read.shape == image.shape and read.dtype.isnative
    np.testing.assert_allclose(read, image, atol=0.01)


def test_fits_extensions_scaling_and_bad_hdus(tmp_path):
    counts = np.arange(12, dtype=np.uint16).reshape(3, 4) + 40000  # (int16 + BZERO on disk)
    table = fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(counts, name="SCI"), table])
    path = tmp_path / "mef.fits"
    hdul.writeto(path)
    assert fits.getheader(path, 1)["BZERO"] == 32768
    for hdu in (None, 1, "SCI"):  # (the empty primary is skipped by default)
        np.testing.assert_array_equal(crowdfit.read_image(path, hdu=hdu, mmap=False), counts)
    with pytest.raises(ValueError, match=r"has no HDU 5; it holds \['PRIMARY', 'SCI'"):
        crowdfit.read_image(path, hdu=5)
    with pytest.raises(ValueError, match="is a table, not an image"):
        crowdfit.read_image(path, hdu=2)
    with pytest.raises(ValueError, match="holds no 2-D image"):
        crowdfit.read_image(path, hdu=0)
    fits.PrimaryHDU().writeto(tmp_path / "empty.fits")
    with pytest.raises(ValueError, match="holds no image"):
        crowdfit.read_image(tmp_path / "empty.fits")
    (tmp_path / "junk.fits").write_text("junk")
    with pytest.raises(ValueError, match="not a readable FITS file"):
        crowdfit.read_image(tmp_path / "junk.fits")
    np.save(tmp_path / "a.npy", counts)
    with pytest.raises(ValueError, match="hdu is for FITS files"):
        crowdfit.read_image(tmp_path / "a.npy", hdu=1)


def test_sky_coordinates_follow_the_wcs_and_scale_the_errors():
    w = _wcs()
    cat = crowdfit.Catalog({
        "x": np.array([0.0, 200.0, 399.0]), "y": np.array([0.0, 100.0, 199.0]),
        "x_err": np.array([0.1, 0.0, 0.2]), "y_err": np.array([0.0, 0.1, 0.2]),
    }, {"psf": "gaussian"})  # fmt: skip
    out = crowdfit.sky_coordinates(cat, w.to_header())  # (a header works as well as a WCS)
    sky = w.pixel_to_world(cat["x"], cat["y"])
    np.testing.assert_allclose(out["ra"], sky.ra.deg, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["dec"], sky.dec.deg, rtol=0, atol=1e-10)
    # 0.5"/px in every direction: rotated, the errors mix, and their sum in quadrature is
    # 0.5" per px; unrotated, x goes to ra and y to dec.
    total = np.hypot(out["ra_err"], out["dec_err"])
    np.testing.assert_allclose(total, 0.5 * np.hypot(cat["x_err"], cat["y_err"]), rtol=1e-3)
    assert np.all(out["ra_err"][:2] > 0) and np.all(out["dec_err"][:2] > 0)
    straight = crowdfit.sky_coordinates(cat, _wcs(angle=0.0))
    np.testing.assert_allclose(straight["ra_err"], 0.5 * cat["x_err"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(straight["dec_err"], 0.5 * cat["y_err"], rtol=1e-3, atol=1e-6)
    assert out.meta["psf"] == "gaussian" and "RA---TAN" in out.meta["wcs"]
    assert len(crowdfit.sky_coordinates(cat[:0], w)["ra"]) == 0
    with pytest.raises(ValueError, match="no celestial"):
        crowdfit.sky_coordinates(cat, WCS(naxis=2))


def test_cli_fits_adds_sky_coordinates_reads_saturate_and_plots(tmp_path, field, capsys):
    image, truth = field
    w = _wcs()
    header = w.to_header()
    header["SATURATE"] = 60000.0
    path = tmp_path / "field.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image.astype(np.float32), header)]).writeto(path)
    out, png = tmp_path / "cat.csv", tmp_path / "fit.png"
    args = ["--sigma", "2", "--out", str(out), "--quiet", "--plot", str(png)]
    assert cli_main(["fit", str(path), *args]) == 0
    captured = capsys.readouterr()
    assert f"plot of the image and the residual written to {png}" in captured.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "50 sources (sigma 2.000) written to" in captured.out
    assert "with ra, dec from the header's WCS" in captured.out
    assert "saturation 60000 (the header's SATURATE)" in captured.err
    cat = crowdfit.Catalog.read_csv(out)
    m = crowdfit.match(truth, cat)
    assert m.n_matched == 50
    true_sky = w.pixel_to_world(truth["x"][m.truth_index], truth["y"][m.truth_index])
    sep = true_sky.separation(w.pixel_to_world(cat["x"], cat["y"])[m.found_index]).arcsec
    assert np.median(sep) < 0.1  # (0.5"/px: a fit within 0.2 px)
    got = np.column_stack([cat["ra"], cat["dec"]])[m.found_index]
    np.testing.assert_allclose(got, np.column_stack([true_sky.ra.deg, true_sky.dec.deg]),
                               atol=0.5 / 3600)  # fmt: skip
    # A FITS table out: the same columns, the PSF and the WCS in its header.
    args = ["--sigma", "2", "--out", str(tmp_path / "cat.fits"), "--quiet"]
    assert cli_main(["fit", str(path), *args]) == 0
    capsys.readouterr()
    with fits.open(tmp_path / "cat.fits") as hdul:
        table, head = hdul["CATALOG"].data, hdul["CATALOG"].header
        np.testing.assert_allclose(table["ra"], cat["ra"], rtol=1e-12)
        assert table["group"].dtype.kind == "i"
        assert head["PSF"] == "gaussian" and head["SIGMA1"] == 2.0
        assert head["CTYPE1"] == "RA---TAN"
    back = crowdfit.Catalog.read_fits(tmp_path / "cat.fits")
    assert back.columns == cat.columns and back.meta["sigma"] == 2.0
    assert back.meta["psf"] == "gaussian" and back["group"].dtype.kind == "i"
    np.testing.assert_allclose(back["flux"], cat["flux"], rtol=1e-12)
    with pytest.raises(ValueError, match="holds no CATALOG table"):
        crowdfit.Catalog.read_fits(path)  # (the image)
    assert cli_main(["fit", str(path), "--hdu", "7"]) == 2
    assert "has no HDU 7" in capsys.readouterr().err
    assert cli_main(["fit", str(path), "--plot", str(tmp_path / "no" / "fit.png")]) == 2
    assert "--plot" in capsys.readouterr().err  # (checked before the fit)
