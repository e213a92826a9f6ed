"""Reading images and movies from disk: TIFF, PNG and NumPy files."""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = ["read_image"]


def read_image(path, *, mmap: bool = True) -> np.ndarray:
    """Read an image or a stack from `.npy`, `.tif`/`.tiff` (tifffile, memory-mapped where the
    file allows) or any format scikit-image reads (PNG, JPEG...).

    **Returns:** the array as stored: `(H, W)` for an image, `(T, H, W)` for a stack. Colour
    images `(H, W, 3|4)` are converted to grey (luminance, scaled to 0-1), with a warning.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (ValueError, OSError) as e:  # (not a NumPy array file: numpy speaks of pickles)
            raise ValueError(f"{path} is not a NumPy .npy array file ({e})") from None
    if ext in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            if mmap:
                try:
                    return tifffile.memmap(path, mode="r")
                except (ValueError, OSError):
                    pass  # compressed or tiled files cannot be memory-mapped
            return tifffile.imread(path)
    import skimage.io

    img = skimage.io.imread(path)
    if img.ndim == 3 and img.shape[-1] in (3, 4) and ext not in (".tif", ".tiff"):
        import skimage.color

        warnings.warn(
            f"{path} is a colour image: converted to grey (luminance, scaled to 0-1); fluxes "
            "are in those units",
            stacklevel=2,
        )
        img = skimage.color.rgb2gray(img[..., :3])
    return img
