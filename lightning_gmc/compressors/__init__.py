"""Layer 1: stateless compressors (tensor -> payload -> tensor) with exact bit accounting.

Compressors are immutable values (frozen dataclasses): build one with :func:`build_compressor` or its
class, change an option with ``dataclasses.replace``. See ``docs/compressors.md``.
"""

from lightning_gmc.compressors.base import (
    CompressionPlan,
    Compressor,
    Payload,
    RandomStreams,
    Segment,
    TensorSpec,
    mix_seed,
    segments_from_numels,
    selected_count,
)
from lightning_gmc.compressors.ef_scaling import ScaledCompressor, scale_for_error_feedback
from lightning_gmc.compressors.quantizers import (
    BitBudgetCompressor,
    NaturalCompression,
    NaturalDithering,
    RandomDithering,
    ScaledSign,
    TernGrad,
)
from lightning_gmc.compressors.registry import COMPRESSORS, build_compressor, register_compressor
from lightning_gmc.compressors.shared_topk import TopKShared
from lightning_gmc.compressors.sparse import (
    Identity,
    RandomBlock,
    RandomK,
    SparseCompressor,
    TopK,
    TopKApprox,
)
from lightning_gmc.compressors.sparse_dithering import SparseDithering
from lightning_gmc.compressors.spherical import SphericalCompression
from lightning_gmc.compressors.wire import WIRE_DTYPES, WireDtype, check_wire_dtype
from lightning_gmc.compressors.workspace import Workspace

_BUILT_IN: tuple[type[Compressor], ...] = (
    # sparsifiers (GMC paper §5)
    Identity,
    TopK,
    TopKApprox,
    TopKShared,
    RandomK,
    RandomBlock,
    # bit-budget compressors (docs/compressors.md)
    RandomDithering,
    NaturalCompression,
    NaturalDithering,
    TernGrad,
    ScaledSign,
    SparseDithering,
    SphericalCompression,
)
for _cls in _BUILT_IN:
    register_compressor(_cls)

__all__ = [
    "BitBudgetCompressor",
    "COMPRESSORS",
    "CompressionPlan",
    "Compressor",
    "Identity",
    "NaturalCompression",
    "NaturalDithering",
    "Payload",
    "RandomBlock",
    "RandomDithering",
    "RandomK",
    "RandomStreams",
    "ScaledCompressor",
    "ScaledSign",
    "Segment",
    "SparseCompressor",
    "SparseDithering",
    "SphericalCompression",
    "TensorSpec",
    "TernGrad",
    "TopK",
    "TopKApprox",
    "TopKShared",
    "WIRE_DTYPES",
    "WireDtype",
    "Workspace",
    "build_compressor",
    "check_wire_dtype",
    "mix_seed",
    "register_compressor",
    "scale_for_error_feedback",
    "segments_from_numels",
    "selected_count",
]
