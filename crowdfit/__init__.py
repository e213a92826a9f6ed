"""crowdfit: joint, batched, differentiable fitting of overlapping spots and stars in JAX."""

import importlib.metadata

from ._background import BACKGROUNDS as BACKGROUNDS
from ._catalog import Catalog as Catalog, model_image as model_image, residual_image as residual_image
from ._fit import fit_regions as fit_regions
from ._image import fit_image as fit_image
from ._match import MatchResult as MatchResult, match as match
from ._noise import NoiseModel as NoiseModel, get_noise as get_noise
from ._psf import PSF as PSF, PSF_NAMES as PSF_NAMES, amplitude as amplitude, get_psf as get_psf
from ._simulate import (
    lognormal_flux as lognormal_flux,
    powerlaw_flux as powerlaw_flux,
    simulate_field as simulate_field,
    simulate_pairs as simulate_pairs,
    simulate_spots as simulate_spots,
)
from ._solution import FitResult as FitResult, Status as Status

__version__ = importlib.metadata.version("crowdfit")
