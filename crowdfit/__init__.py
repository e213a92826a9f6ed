"""crowdfit: joint, batched, differentiable fitting of overlapping spots and stars in JAX."""

import importlib.metadata

from ._background import BACKGROUNDS as BACKGROUNDS
from ._baseline import per_spot_fit as per_spot_fit
from ._catalog import Catalog as Catalog
from ._catalog import model_image as model_image
from ._catalog import residual_image as residual_image
from ._crlb import CRLBResult as CRLBResult
from ._crlb import crlb as crlb
from ._fit import fit_regions as fit_regions
from ._image import fit_image as fit_image
from ._io import read_header as read_header
from ._io import read_image as read_image
from ._io import sky_coordinates as sky_coordinates
from ._match import MatchResult as MatchResult
from ._match import match as match
from ._movie import Traces as Traces
from ._movie import fit_movie as fit_movie
from ._noise import NoiseModel as NoiseModel
from ._noise import get_noise as get_noise
from ._plot import plot_catalog as plot_catalog
from ._plot import plot_traces as plot_traces
from ._psf import PSF as PSF
from ._psf import PSF_NAMES as PSF_NAMES
from ._psf import amplitude as amplitude
from ._psf import get_psf as get_psf
from ._simulate import lognormal_flux as lognormal_flux
from ._simulate import powerlaw_flux as powerlaw_flux
from ._simulate import simulate_field as simulate_field
from ._simulate import simulate_pairs as simulate_pairs
from ._simulate import simulate_spots as simulate_spots
from ._solution import FitResult as FitResult
from ._solution import Status as Status

try:
    __version__ = importlib.metadata.version("crowdfit")
except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+unknown"
