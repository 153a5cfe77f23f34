"""The decision of ``density="auto"``: which density (or the dense route) to run, from predicted steps.

Inputs are the candidates' predicted step and communication times (:mod:`lightning_gmc.plan.cost`,
with the compute time and link rate measured during the run). The rule, in order:

1. **A target fraction of compute for communication** (``comm_fraction = f``): the densest candidate
   whose communication takes at most ``f * compute``; when none does, the fastest one.
2. **Otherwise, the fastest to reach the same number of steps, then the densest near it**: among the
   candidates within ``slack`` of the fastest predicted step (``step <= (1 + slack) * fastest``), the
   densest. The dense route counts as density 1, so it wins every near tie: compression must pay
   clearly to be chosen, and more information per step is taken whenever it costs (almost) nothing.
3. **Hysteresis** (``current``, the setting running now): the current setting stays while its predicted
   step is within ``hysteresis`` of the one rule 2 picks (``current <= (1 + hysteresis) * best``), or
   while its communication stays within ``(1 + hysteresis) f`` of compute and no denser candidate's is
   within ``(1 - hysteresis) f`` (rule 1), so that noise in the measurements does not make the run
   switch back and forth.

:func:`worth_a_trial` then proposes a close candidate the run has not measured yet, which
``density="auto"`` runs for a few steps before it settles (the measurement replaces the prediction).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["Choice", "Option", "choose_density", "worth_a_trial"]


@dataclass(frozen=True)
class Option:
    """One candidate setting with its predicted step.

    Attributes:
        density: the compressor's density, or None for the dense route (compressor ``"none"``).
        step_s: predicted seconds per step.
        comm_s: predicted seconds of communication per step.
    """

    density: float | None
    step_s: float
    comm_s: float

    @property
    def rank(self) -> float:
        """Density for ordering: the dense route counts as 1, above any compressed setting."""
        return 2.0 if self.density is None else self.density


@dataclass(frozen=True)
class Choice:
    """The decision and why."""

    option: Option
    reason: str


def choose_density(
    options: Sequence[Option],
    compute_s: float,
    comm_fraction: float | None = None,
    slack: float = 0.05,
    hysteresis: float = 0.1,
    current: Option | None = None,
) -> Choice:
    """Pick one of ``options`` by the module's rule.

    Args:
        options: the candidates (the dense route and the densities within the user's bounds).
        compute_s: measured compute seconds per step (forward, backward, optimizer).
        comm_fraction: target ``communication <= comm_fraction * compute``; None: fastest, then densest.
        slack: relative distance from the fastest step within which the densest candidate is taken.
        hysteresis: how much slower than the rule's pick ``current`` may be and still stay.
        current: the setting running now (one of ``options``), or None at the first decision.

    Raises:
        ValueError: no options.
    """
    if not options:
        raise ValueError("choose_density needs at least one option")
    fastest = min(options, key=lambda o: o.step_s)
    if comm_fraction is not None:
        budget = comm_fraction * compute_s
        within = [o for o in options if o.comm_s <= budget]
        if current is not None and current.comm_s <= (1 + hysteresis) * budget:
            denser = [o for o in options if o.rank > current.rank and o.comm_s <= (1 - hysteresis) * budget]
            if not denser:
                return Choice(
                    current, f"kept: communication within {comm_fraction:g} of compute (hysteresis)"
                )
        if within:
            return Choice(
                max(within, key=lambda o: o.rank),
                f"densest with communication <= {comm_fraction:g} x compute",
            )
        return Choice(fastest, f"no setting keeps communication within {comm_fraction:g} x compute: fastest")
    near = [o for o in options if o.step_s <= (1 + slack) * fastest.step_s]
    best = max(near, key=lambda o: o.rank)
    if current is not None and current != best and current.step_s <= (1 + hysteresis) * best.step_s:
        return Choice(
            current, f"kept: within {hysteresis:g} of the best ({best.step_s * 1e3:.4g} ms; hysteresis)"
        )
    why = "fastest" if best is fastest else f"densest within {slack:g} of the fastest"
    return Choice(best, why)


def worth_a_trial(
    options: Sequence[Option], chosen: Option, measured: Collection[float | None], margin: float
) -> Option | None:
    """A candidate to try although the rule kept ``chosen``: when ``chosen`` has been measured and
    some candidate not measured yet is predicted within ``margin`` of it (``step <= (1 + margin) *
    chosen``), the fastest of those (the densest on a tie), so that a measurement, not the cost
    model's error, settles a close call. None when ``margin`` is 0, ``chosen`` is a prediction itself,
    or no candidate is that close.
    """
    if margin <= 0 or chosen.density not in measured:
        return None
    bound = (1 + margin) * chosen.step_s
    close = [o for o in options if o.density not in measured and o.step_s <= bound]
    return min(close, key=lambda o: (o.step_s, -o.rank)) if close else None
