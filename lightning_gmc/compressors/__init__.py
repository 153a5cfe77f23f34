"""Layer 1: stateless compressors (tensor -> payload -> tensor) with exact bit accounting."""

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
from lightning_gmc.compressors.quantizers import (
    BitBudgetCompressor,
    NaturalCompression,
    NaturalDithering,
    RandomDithering,
    ScaledCompressor,
    ScaledSign,
    TernGrad,
    scale_for_error_feedback,
)
from lightning_gmc.compressors.registry import COMPRESSORS, build_compressor, register_compressor
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

for _cls in (Identity, TopK, TopKApprox, RandomK, RandomBlock):
    register_compressor(_cls)
# Issue 4: bit-budget compressors (spec compressors.md §4-§6).
for _cls in (
    RandomDithering,
    NaturalCompression,
    NaturalDithering,
    TernGrad,
    ScaledSign,
    SparseDithering,
    SphericalCompression,
):
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
    "build_compressor",
    "mix_seed",
    "register_compressor",
    "scale_for_error_feedback",
    "segments_from_numels",
    "selected_count",
]
