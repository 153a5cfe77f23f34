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
from lightning_gmc.compressors.registry import COMPRESSORS, build_compressor, register_compressor
from lightning_gmc.compressors.sparse import (
    Identity,
    RandomBlock,
    RandomK,
    SparseCompressor,
    TopK,
    TopKApprox,
)

for _cls in (Identity, TopK, TopKApprox, RandomK, RandomBlock):
    register_compressor(_cls)

__all__ = [
    "COMPRESSORS",
    "CompressionPlan",
    "Compressor",
    "Identity",
    "Payload",
    "RandomBlock",
    "RandomK",
    "RandomStreams",
    "Segment",
    "SparseCompressor",
    "TensorSpec",
    "TopK",
    "TopKApprox",
    "build_compressor",
    "mix_seed",
    "register_compressor",
    "segments_from_numels",
    "selected_count",
]
