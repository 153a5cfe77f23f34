"""Per-element costs of a device: what each method's pipeline and each compressor cost per element.

A :class:`DeviceProfile` is a small JSON document written by ``python -m lightning_gmc.plan
--calibrate`` (:mod:`lightning_gmc.plan.calibrate`), which times the library's own code on the current
device. Shipped profiles (``lightning_gmc/plan/profiles/``):

* ``cpu``: measured on the machine named in the file (CPU model, threads, torch version);
* ``h100``, ``h200``: **not measured**: derived from the HBM bandwidth of the public specifications
  and the bytes each pipeline moves per element (counted on the CPU run), as the file's ``source``
  says. Calibrate on the GPU (``--calibrate``) to replace them.

:func:`pipeline_seconds` turns a profile and an arm's traffic into the seconds the hook adds to a
step beyond what DDP does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_gmc.methods import METHODS
from lightning_gmc.plan.traffic import Arm, Traffic

__all__ = [
    "DeviceProfile",
    "PROFILE_DIR",
    "compressor_ns",
    "load_profile",
    "method_key",
    "pipeline_seconds",
    "shipped_profiles",
]

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class DeviceProfile:
    """Costs per element (nanoseconds) of one device, measured or derived.

    Attributes:
        name: what the profile is of (``"cpu"``, ``"h100"``).
        device: ``"cpu"`` or ``"cuda"``.
        measured: True when timed on the device; False when derived (see ``source``).
        source: how the numbers were obtained (machine, threads, torch; or the derivation).
        pass_ns: one read-modify-write pass over an fp32 element (``x.mul_(c)``).
        optimizer_momentum_ns: what ``SGD(momentum, weight_decay)``'s step costs more than plain SGD's,
            per element: what a method that takes momentum into its hook saves in the optimizer step
            (on the CPU the measured pass times the extra bytes it moves).
        bf16_hook_ns: torch's ``bf16_compress_hook`` per element (cast, divide, cast back).
        methods_ns: per method (``"gmc+"`` is GMC with a detached point), its step per element with
            the identity compressor (``compressor="none"``): what it adds besides compression.
        compressors_ns: per compressor and density, ``compress + subtract_own + decode`` per element.
        decode_ns_per_nnz: per compressor, decoding one more worker's payload, per coordinate sent.
        collective_latency_s: the fixed cost of one collective (a 4-byte all-reduce between two
            processes on the device's usual back-end: gloo on loopback for the CPU).
        bytes_per_element: bytes each timed pipeline reads and writes per element (counted on the
            calibration run; what GPU profiles are derived from).
        bucket_overhead_s: the fixed cost of the hook on one bucket, whatever its size (screening, the
            method's and the exchange's Python work, launching the collective): the method step with
            the identity on a bucket of a few elements. The per-element costs above are measured
            beyond it.
        compressor_overhead_s: per compressor, its fixed cost per bucket beyond the identity's (per
            segment selection, index bookkeeping), at 1 % density on a bucket of a few elements.
    """

    name: str
    device: str
    measured: bool
    source: str
    pass_ns: float
    optimizer_momentum_ns: float
    bf16_hook_ns: float
    methods_ns: Mapping[str, float]
    compressors_ns: Mapping[str, Mapping[str, float]]
    decode_ns_per_nnz: Mapping[str, float]
    collective_latency_s: float
    bytes_per_element: Mapping[str, float] = field(default_factory=dict)
    bucket_overhead_s: float = 0.0
    compressor_overhead_s: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DeviceProfile:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with the package."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name (``"cpu"``, ``"h100"``, ``"h200"``) or a JSON file written by
    ``--calibrate``.

    Raises:
        ValueError: neither a shipped name nor an existing file (the message lists the names).
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(
            f"no device profile {str(name_or_path)!r}: give a shipped one ({', '.join(shipped_profiles())}) "
            f"or a JSON file written by `python -m lightning_gmc.plan --calibrate FILE`"
        )
    return DeviceProfile.from_mapping(json.loads(path.read_text()))


def method_key(arm: Arm) -> str:
    """The profile's key of the arm's method pipeline (``"gmc+"`` for GMC with a detached point)."""
    return "gmc+" if arm.method == "gmc" and arm.detach > 0 else arm.method


def compressor_ns(profile: DeviceProfile, name: str, density: float) -> float:
    """Cost per element of compressor ``name`` at ``density``: interpolated linearly in
    ``log(density)`` between the calibrated densities, clamped at the ends.

    Raises:
        KeyError: the profile has no measurement of this compressor.
    """
    table = profile.compressors_ns.get(name)
    if table is None:
        raise KeyError(
            f"profile {profile.name!r} has no cost for compressor {name!r} (it has "
            f"{', '.join(sorted(profile.compressors_ns))}); calibrate with --calibrate to measure it"
        )
    points = sorted((float(d), ns) for d, ns in table.items())
    if len(points) == 1 or density <= points[0][0]:
        return points[0][1]
    if density >= points[-1][0]:
        return points[-1][1]
    for (d0, c0), (d1, c1) in zip(points, points[1:], strict=False):
        if d0 <= density <= d1:
            w = (math.log(density) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return c0 + w * (c1 - c0)
    return points[-1][1]  # pragma: no cover - the loop covers every density between the ends


def pipeline_seconds(profile: DeviceProfile, arm: Arm, traffic: Traffic, ranks_per_node: int = 1) -> float:
    """Seconds per step the arm's hook adds on one rank, beyond DDP's own all-reduce and optimizer step.

    ``method + compressor`` per element of the elements this rank runs the method on (all of them,
    or its shard under ``hierarchy="node"``), plus decoding the other workers' payloads when they are
    all-gathered, plus two passes for the dense route (zeroing and the division) and, under
    ``hierarchy="node"``, packing, unpacking and the division by G; minus the momentum step the
    optimizer no longer does for methods that take it over; plus the fixed cost of each bucket (the
    hook's and the compressor's, :attr:`DeviceProfile.bucket_overhead_s`).
    """
    n = traffic.numel
    if arm.method == "ddp":
        return 0.0
    if arm.method == "ddp_bf16":
        return profile.bf16_hook_ns * n * 1e-9
    hierarchical = traffic.intra_bytes > 0
    shard = n / ranks_per_node if hierarchical else n
    nnz = traffic.nnz / ranks_per_node if hierarchical else traffic.nnz
    key = method_key(arm)
    if key not in profile.methods_ns:
        known = ", ".join(sorted(profile.methods_ns))
        raise KeyError(f"profile {profile.name!r} has no cost for method {key!r} (it has {known})")
    ns = profile.methods_ns[key] * shard  # measured with the identity: nothing more for "none"
    if arm.compressor != "none":
        ns += compressor_ns(profile, arm.compressor, arm.density) * shard
    gathered = traffic.routes.count("allgather") / max(len(traffic.routes), 1)
    ns += gathered * (traffic.workers - 1) * profile.decode_ns_per_nnz.get(arm.compressor, 0.0) * nnz
    ns += 2 * profile.pass_ns * shard * traffic.routes.count("dense") / max(len(traffic.routes), 1)
    if hierarchical:
        ns += profile.pass_ns * (2 * n + shard)
    if METHODS[arm.method].takes_over_optimizer:
        ns -= profile.optimizer_momentum_ns * n
    fixed = profile.bucket_overhead_s + profile.compressor_overhead_s.get(arm.compressor, 0.0)
    return ns * 1e-9 + traffic.buckets * fixed
