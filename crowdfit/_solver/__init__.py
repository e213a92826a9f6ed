"""Solvers for one region's problem: Levenberg–Marquardt, and any optax optimizer."""

from .levenberg_marquardt import levenberg_marquardt as levenberg_marquardt
from .optax_solver import optax_minimise as optax_minimise
