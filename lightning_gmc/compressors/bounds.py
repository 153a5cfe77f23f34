"""Bits-versus-error lower bounds and the variance/contraction algebra (``docs/compressors.md``).

* :func:`epsilon_lower_bound` / :func:`omega_lower_bound`: the volume ("uncertainty principle",
  Safaryan, Shulgin, Richtárik 2020; used by Albasyoni et al. 2020) bound for any compressor whose
  message, for a fixed shared seed, takes at most ``2^b`` values: ``eps >= 4^(-b/d)`` for contractive
  and ``omega >= 1/(4^(b/d) - 1)`` for unbiased compressors. ``b`` counts *every* bit, norms and
  scales included.
* :func:`omega_to_delta`: an unbiased ``C`` in ``U(omega)`` scaled by ``1/(1+omega)`` is contractive
  with ``delta = 1/(1+omega)`` (GMC paper §3.3, Assumption 1).
* :func:`compose_omega`: independent unbiased compressors compose to ``(1+w1)(1+w2) - 1``.
"""

from __future__ import annotations

import math

__all__ = ["compose_omega", "epsilon_lower_bound", "omega_lower_bound", "omega_to_delta"]


def epsilon_lower_bound(bits_per_coord: float) -> float:
    """Smallest normalized error ``E||C(x)-x||^2/||x||^2`` any compressor can guarantee at this rate."""
    if bits_per_coord < 0:
        raise ValueError(f"bits_per_coord must be >= 0, got {bits_per_coord}")
    return 4.0 ** (-bits_per_coord)


def omega_lower_bound(bits_per_coord: float) -> float:
    """Smallest variance parameter of an unbiased compressor at this rate: ``1 / (4^r - 1)``."""
    if bits_per_coord <= 0:
        return math.inf
    return 1.0 / math.expm1(bits_per_coord * math.log(4.0))


def omega_to_delta(omega: float) -> float:
    """Contraction parameter of ``C / (1 + omega)`` for ``C`` in ``U(omega)``."""
    return 1.0 / (1.0 + omega)


def compose_omega(*omegas: float) -> float:
    """Variance parameter of a composition of independent unbiased compressors."""
    prod = 1.0
    for w in omegas:
        prod *= 1.0 + w
    return prod - 1.0
