"""One validated configuration of a run: which method, which compressor, and their options.

:class:`GMCConfig` is what :class:`~lightning_gmc.GMCStrategy`, :class:`~lightning_gmc.Simulator` and
the plain-DDP path (:meth:`~lightning_gmc.GMCHookState.from_config`) are built from, so a value is
checked once, with one message, whichever entry point the user takes::

    config = GMCConfig(method="gmc", compressor="rbgs", density=0.01, detach=0.5)   # GMC+
    method = config.build()

Every float is checked to be finite: a ``nan`` detach coefficient would otherwise mark every bucket
non-finite and train nothing. Types are checked too (``lightning_gmc._arguments``): ``ef_scaling="no"``
or ``seed=1.7`` is refused instead of being read as ``True`` or ``1``.

``density="auto"`` lets the hook choose the density (or the dense route) during the run, within the
bounds of :class:`AutoDensity` (``docs/planner.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_gmc._arguments import check_bool, check_float, check_int, check_mapping, describe_value
from lightning_gmc.compressors import COMPRESSORS, Compressor, build_compressor, check_wire_dtype
from lightning_gmc.compressors.wire import WireDtype
from lightning_gmc.methods import METHODS, Method, build_method, method_option_names

__all__ = [
    "AUTO_DENSITY_METHODS",
    "AutoDensity",
    "GMCConfig",
    "Hierarchy",
    "NonFinitePolicy",
    "WorldSizeChangePolicy",
    "check_density",
    "check_detach",
    "check_finite_options",
    "check_hierarchy",
    "check_momentum",
    "check_nonfinite_policy",
    "check_world_size_policy",
]

NonFinitePolicy = Literal["skip", "raise"]
#: methods whose one compressor ``density="auto"`` may replace between steps (DGC and CSER change or
#: combine compressors themselves; ``dmsgd`` is dense by definition)
AUTO_DENSITY_METHODS = ("gmc", "ef", "ef21", "def_a", "ef_server_momentum", "gmc_lr_inside")
WorldSizeChangePolicy = Literal["error", "reset_residuals"]
Hierarchy = Literal["flat", "node"]


def check_density(density: object) -> float:
    """``density`` as a float in (0, 1]."""
    value = check_float("density", density, "in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return value


def check_detach(detach: object) -> float:
    """``detach`` as a finite float >= 0 (0 = GMC, > 0 = GMC+)."""
    value = check_float("detach", detach, ">= 0 and finite (0 = GMC, > 0 = GMC+)")
    if value < 0:
        raise ValueError(f"detach must be >= 0 and finite (0 = GMC, > 0 = GMC+), got {detach!r}")
    return value


def check_momentum(momentum: object) -> float:
    """``momentum`` (``beta``) as a float in [0, 1)."""
    value = check_float("momentum", momentum, "in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return value


def check_nonfinite_policy(nonfinite: object) -> NonFinitePolicy:
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
    return nonfinite  # type: ignore[return-value]


def check_world_size_policy(policy: object) -> WorldSizeChangePolicy:
    if policy not in ("error", "reset_residuals"):
        raise ValueError(f"on_world_size_change must be 'error' or 'reset_residuals', got {policy!r}")
    return policy  # type: ignore[return-value]


def check_hierarchy(hierarchy: object) -> Hierarchy:
    if hierarchy not in ("flat", "node"):
        raise ValueError(
            f"hierarchy must be 'flat' (every rank is a worker) or 'node' (one worker per node, dense "
            f"averaging inside it), got {hierarchy!r}"
        )
    return hierarchy  # type: ignore[return-value]


def _takes_wire_dtype(name: str) -> bool:
    cls = COMPRESSORS.get(name)
    return (
        cls is not None
        and dataclasses.is_dataclass(cls)
        and any(f.name == "wire_dtype" for f in dataclasses.fields(cls))
    )


def check_finite_options(owner: str, options: Mapping[str, Any]) -> None:
    """Reject ``nan``/``inf`` in float options (also inside lists and tuples, e.g. a warm-up schedule)."""
    for key, value in options.items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{owner} option {key}={value!r} must be finite")


@dataclass(frozen=True)
class AutoDensity:
    """How ``density="auto"`` chooses (``docs/planner.md``, "density='auto'").

    At step ``warmup_steps`` and then every ``interval`` steps, every rank times its recent steps and a
    collective of known size on the method's process group; rank 0 predicts each candidate's step with
    the cost model (:mod:`lightning_gmc.plan`) and picks one, and every rank switches to it before the
    next step. Candidates: the method's compressor at the densities of the 1-2-5 series between
    ``min_density`` and ``max_density``, and the dense route (compressor ``"none"``: GMC is then
    exactly DMSGD, i.e. DDP with SGD momentum, once its residual has been sent).

    Attributes:
        min_density, max_density: bounds of the compressed densities.
        comm_fraction: when set, the densest candidate whose predicted communication is at most this
            fraction of the measured compute time (else the fastest, then the densest within ``slack``).
        slack: the densest candidate within this fraction of the fastest predicted step is taken.
        hysteresis: the current setting is kept while its predicted step is within this fraction of
            the one the rule picks.
        explore: a candidate predicted within this fraction of the step of the setting the rule keeps
            is tried for ``trial_steps`` steps when it has not been measured in this round (0: never;
            ignored with ``comm_fraction``).
        warmup_steps: steps before the first decision (the first two after a start or a switch are
            not timed).
        interval: steps between later rounds of decisions; 0 runs one round. A decision that switches
            to a setting not measured yet is a trial, confirmed or undone by measurement at another
            decision ``trial_steps`` later, within the same round.
        trial_steps: steps a trial runs before the decision that measures it (the first two are not
            timed); more steps measure a noisy machine better.
        pin: a density, or ``"none"`` for the dense route, to run regardless of the measurements
            (they are still taken and logged); change it during a run with ``state.auto.pin(...)``.
        profile: the device profile of per-element costs (a shipped name or a ``--calibrate`` JSON);
            None picks the shipped one of the device (``cpu``, ``h100``, ``h200``).
    """

    min_density: float = 0.01
    max_density: float = 0.1
    comm_fraction: float | None = None
    slack: float = 0.05
    hysteresis: float = 0.1
    explore: float = 0.3
    warmup_steps: int = 8
    trial_steps: int = 16
    interval: int = 1000
    pin: float | str | None = None
    profile: str | None = None

    def __post_init__(self) -> None:
        low, high = check_density(self.min_density), check_density(self.max_density)
        if low > high:
            raise ValueError(f"auto_density: min_density {low} is above max_density {high}")
        for name in ("slack", "hysteresis", "explore"):
            if check_float(f"auto_density {name}", getattr(self, name), "a finite number >= 0") < 0:
                raise ValueError(
                    f"auto_density: {name} must be a finite number >= 0, got {getattr(self, name)!r}"
                )
        if self.comm_fraction is not None:
            if check_float("auto_density comm_fraction", self.comm_fraction, "> 0") <= 0:
                raise ValueError(f"auto_density: comm_fraction must be > 0, got {self.comm_fraction!r}")
        for name in ("warmup_steps", "trial_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 4:
                raise ValueError(f"auto_density: {name} must be an int >= 4, got {value!r}")
        if not isinstance(self.interval, int) or (self.interval != 0 and self.interval < 4):
            raise ValueError(
                f"auto_density: interval must be 0 (decide once) or an int >= 4, got {self.interval!r}"
            )
        if self.pin is not None and self.pin != "none":
            check_density(self.pin)

    @classmethod
    def from_options(cls, options: AutoDensity | Mapping[str, Any] | None) -> AutoDensity:
        """The options from an instance, a dict of its fields (LightningCLI, YAML) or None (defaults)."""
        if isinstance(options, AutoDensity):
            return options
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"auto_density does not take {unknown}; it takes {sorted(known)}")
        return cls(**options)


@dataclass(frozen=True)
class GMCConfig:
    """What to run, validated on construction.

    Attributes:
        method: method name (see ``lightning_gmc.METHODS``).
        compressor: compressor name or instance; None takes the method's default (``"topk"``;
            ``"none"`` for the dense ``"dmsgd"``).
        density: fraction of each parameter sent per step, in (0, 1] (sparsifiers); or ``"auto"``: the
            hook chooses it during the run (and the dense route when compression does not pay), within
            the bounds of ``auto_density`` (:class:`AutoDensity`).
        detach: GMC+'s detach coefficient; None takes the method's default (0 for GMC). Only for
            methods that have one (``docs/algorithms.md`` section 2.3).
        momentum: overrides the optimizer's momentum when not None (methods that take over the
            optimizer; ``ef`` leaves momentum to the optimizer and refuses it).
        seed: seed of the shared random streams (RBGS blocks, random-k); equal on every rank.
        method_options: further options of the method.
        compressor_options: further options of the compressor.
        ef_scaling: scale unbiased compressors by ``1/(1+omega)`` inside error feedback (None: exactly
            for methods with error feedback; ``docs/algorithms.md`` section 3.5).
        nonfinite: ``"skip"`` or ``"raise"`` on a non-finite bucket gradient.
        on_world_size_change: resuming a checkpoint of another world size: ``"error"`` or
            ``"reset_residuals"``.
        hierarchy: ``"flat"`` (default; every rank is a worker) or ``"node"`` (gradients averaged
            densely inside each node, the method runs with one worker per node between nodes;
            ``docs/algorithms.md`` section 3.11).
        wire_dtype: dtype the compressor's float values travel in: ``"fp32"`` (default), ``"bf16"``
            or ``"fp16"`` (``docs/algorithms.md`` section 3.12: each worker's rounding and the
            rounding of a 16-bit sum both stay in the method's state); only for compressors that send
            float values (``none``, ``topk``, ``topk_approx``, ``topk_shared``, ``randk``, ``rbgs``).
        auto_density: options of ``density="auto"`` (:class:`AutoDensity`, or a dict of its fields).
    """

    method: str = "gmc"
    compressor: str | Compressor | None = None
    density: float | Literal["auto"] = 0.01
    detach: float | None = None
    momentum: float | None = None
    seed: int = 0
    method_options: Mapping[str, Any] = field(default_factory=dict)
    compressor_options: Mapping[str, Any] = field(default_factory=dict)
    ef_scaling: bool | None = None
    nonfinite: NonFinitePolicy = "skip"
    on_world_size_change: WorldSizeChangePolicy = "error"
    hierarchy: Hierarchy = "flat"
    wire_dtype: WireDtype = "fp32"
    auto_density: AutoDensity | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        # Own copies: a caller mutating its dict later must not change a validated config.
        object.__setattr__(self, "method_options", check_mapping("method_options", self.method_options))
        object.__setattr__(
            self, "compressor_options", check_mapping("compressor_options", self.compressor_options)
        )
        object.__setattr__(self, "seed", check_int("seed", self.seed))  # 2.0 from YAML is 2; 1.7 fails
        if self.auto_density is not None and not isinstance(self.auto_density, AutoDensity | Mapping):
            raise TypeError(
                f"auto_density must be an AutoDensity, a dict of its fields or None, got "
                f"{describe_value(self.auto_density)}"
            )
        if self.density == "auto":
            object.__setattr__(self, "auto_density", AutoDensity.from_options(self.auto_density))
        self.validate()

    @property
    def auto(self) -> AutoDensity | None:
        """The options of ``density="auto"``; None for a fixed density."""
        return self.auto_density if isinstance(self.auto_density, AutoDensity) else None

    @property
    def initial_density(self) -> float:
        """The density the run starts with: the fixed one, or under ``"auto"`` the pinned density or
        ``min_density`` (the compressed setting the first steps are timed with)."""
        auto = self.auto
        if auto is None:
            return float(self.density)  # type: ignore[arg-type]
        return float(auto.pin) if isinstance(auto.pin, int | float) else auto.min_density

    def validate(self) -> None:
        """Raise a ValueError (a TypeError for a value of the wrong type) naming the argument, what it
        got and the valid choices, for the first bad value; then build the method once, so that the
        compressor's and the method's own options are checked now too."""
        _ = self.method_name
        compressor = self.compressor
        if not (compressor is None or isinstance(compressor, str | Compressor)):
            raise TypeError(
                f"compressor must be a compressor name, a Compressor instance or None, got "
                f"{describe_value(compressor)}"
            )
        if isinstance(compressor, str) and compressor.lower() not in COMPRESSORS:
            raise ValueError(
                f"unknown compressor {compressor!r}; valid names: {', '.join(sorted(COMPRESSORS))}"
            )
        if self.density == "auto":
            self._validate_auto()
        else:
            check_density(self.density)
            if self.auto_density is not None:
                raise ValueError(
                    "auto_density sets the bounds of density='auto'; set density='auto' or drop it"
                )
        check_bool("ef_scaling", self.ef_scaling, optional=True)
        if self.detach is not None:
            check_detach(self.detach)
            if "detach" not in method_option_names(self.method_name):
                raise ValueError(f"method {self.method!r} has no detach coefficient; leave `detach` unset")
        if self.momentum is not None:
            check_momentum(self.momentum)
            if not METHODS[self.method_name].takes_over_optimizer:
                raise ValueError(
                    f"method {self.method!r} leaves momentum to the optimizer; set it there (e.g. "
                    f"AdamW(betas=...), SGD(momentum=...)) and leave `momentum` unset"
                )
        check_nonfinite_policy(self.nonfinite)
        check_world_size_policy(self.on_world_size_change)
        check_hierarchy(self.hierarchy)
        if "detach" in self.method_options:
            check_detach(self.method_options["detach"])
        check_finite_options("method", self.method_options)
        check_finite_options("compressor", self.compressor_options)
        check_wire_dtype(self.wire_dtype)
        if "wire_dtype" in self.compressor_options:
            raise ValueError("set wire_dtype as GMCConfig(wire_dtype=...), not in compressor_options")
        if self.wire_dtype != "fp32":
            name = self.compressor_name
            if name is not None and not _takes_wire_dtype(name):
                raise ValueError(
                    f"wire_dtype={self.wire_dtype!r} applies to compressors that send float values "
                    f"({', '.join(sorted(n for n in COMPRESSORS if _takes_wire_dtype(n)))}); {name!r} "
                    f"sends its own packed codes. Use wire_dtype='fp32' with it."
                )
        self.build()

    def _validate_auto(self) -> None:
        name = self.method_name
        if name not in AUTO_DENSITY_METHODS:
            raise ValueError(
                f"density='auto' replaces the method's one compressor between steps: it works with "
                f"{', '.join(AUTO_DENSITY_METHODS)}; method {name!r} "
                + (
                    "is dense by definition"
                    if name == "dmsgd"
                    else "changes or combines its compressors itself"
                )
                + ". Give it a fixed density."
            )
        compressor = self.compressor if self.compressor is not None else METHODS[name].default_compressor
        cls = (
            type(compressor)
            if isinstance(compressor, Compressor)
            else COMPRESSORS.get(str(compressor).lower())
        )
        if (
            cls is None
            or not dataclasses.is_dataclass(cls)
            or "density" not in {f.name for f in dataclasses.fields(cls)}
        ):
            raise ValueError(
                f"density='auto' chooses the density of a sparsifier ('topk', 'topk_approx', 'topk_shared', "
                f"'randk', 'rbgs'); {compressor!r} has none. Give a sparsifier, or no density for it."
            )
        if self.hierarchy != "flat":
            raise ValueError(
                "density='auto' runs with hierarchy='flat' for now; for hierarchy='node', choose the density "
                "with `python -m lightning_gmc.plan --nodes N --ranks-per-node G ...` and give it as a number"
            )

    @property
    def compressor_name(self) -> str | None:
        """The compressor's registry name (None for an instance of an unregistered class)."""
        compressor = self.compressor
        if compressor is None:
            compressor = METHODS[self.method_name].default_compressor
        if isinstance(compressor, Compressor):
            return compressor.name if compressor.name in COMPRESSORS else None
        return compressor.lower() if compressor.lower() in COMPRESSORS else None  # build() names it

    @property
    def method_name(self) -> str:
        """The registered method name (lower case)."""
        if not isinstance(self.method, str) or self.method.lower() not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {', '.join(sorted(METHODS))}")
        return self.method.lower()

    def build(self) -> Method:
        """A new method instance (with its compressor) for this configuration."""
        options = dict(self.method_options)
        if self.detach is not None:
            options["detach"] = float(self.detach)
        compressor = self.compressor
        if compressor is None:
            compressor = METHODS[self.method_name].default_compressor
        built = build_compressor(compressor, density=self.initial_density, **self.compressor_options)
        if self.auto is not None and getattr(built, "density", None) != self.initial_density:
            built = dataclasses.replace(built, density=self.initial_density)  # type: ignore[type-var]
        built_wire = getattr(built, "wire_dtype", "fp32")
        if self.wire_dtype != built_wire:
            if not any(f.name == "wire_dtype" for f in dataclasses.fields(built)):  # type: ignore[arg-type]
                raise ValueError(f"wire_dtype={self.wire_dtype!r} does not apply to {built.describe()!r}")
            if built_wire != "fp32":
                raise ValueError(
                    f"the compressor instance has wire_dtype={built_wire!r} and the configuration "
                    f"{self.wire_dtype!r}; set one of them"
                )
            built = dataclasses.replace(built, wire_dtype=self.wire_dtype)  # type: ignore[type-var]
        return build_method(self.method, built, ef_scaling=self.ef_scaling, **options)
