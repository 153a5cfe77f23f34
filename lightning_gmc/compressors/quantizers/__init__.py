"""Quantizing compressors with exact bit accounting (``docs/compressors.md``), one module per family.

* :mod:`.base`: :class:`BitBudgetCompressor` (``omega``/``delta``), the norm-group layout;
* :mod:`.dithering`: ``qsgd`` and ``natural_dithering``;
* :mod:`.terngrad_sign`: ``terngrad`` and ``scaled_sign``;
* :mod:`.natural`: ``natural``.

=====================  ===================================  =====================================
name                   what it sends per norm group of d     parameter (worst case over x)
=====================  ===================================  =====================================
``qsgd``               ``||x||_p`` (fp32) + d codes of        ``U(omega)``,
                       ``1 + ceil(log2(s+1))`` bits           ``omega = min(d^{2/r}/(4s^2), d^{1/r}/s)``,
                       (sign + level)                         ``r = min(p, 2)``
``natural_dithering``  same layout, power-of-two levels       ``U(omega)``, ``omega = 1/8 +
                       ``{0, 2^{1-s}, ..., 1/2, 1}``          d^{1/r} 2^{1-s} min(1, d^{1/r} 2^{1-s})``
``natural``            9 bits per coordinate (sign +          ``U(1/8)``
                       8-bit exponent), no norm
``terngrad``           ``||x||_inf`` (fp32) + d trits,        ``U((sqrt(d) - 1) / 2)``
                       five per byte (1.6 bits/coord)
``scaled_sign``        ``||x||_1 / d`` (fp32) + d sign bits   ``B(delta)``, ``delta = 1/d``
                                                              (Gaussian x: about ``2/pi``)
=====================  ===================================  =====================================

A *norm group* is a whole parameter (segment) by default, or a block of ``block_size`` consecutive
coordinates inside a parameter when ``block_size`` is set (QSGD's "bucketing"): each block then sends
its own fp32 scale and ``d`` in the formulas above becomes the block size. Groups never cross a
parameter boundary, so the result does not depend on how DDP groups parameters into buckets; private
randomness is drawn per parameter for the same reason.

Wire format of one payload (the whole bucket): ``scales`` (fp32, one per norm group) followed by one
``uint8`` tensor of packed codes (:mod:`lightning_gmc.compressors.bitpack`). ``payload_bits`` is the
information content: ``32 * groups + numel * bits_per_code`` (ternary: ``8 * ceil(numel / 5)``); the
wire adds at most 7 bits of byte padding per payload. Decoding reads only the wire tensors, so the
sender's own contribution is bit-identical to what every other rank decodes.

Use the unbiased quantizers with methods that need ``E[C(x)] = x`` (plain compressed SGD, DIANA);
with error feedback wrap them with :func:`~lightning_gmc.compressors.ef_scaling.scale_for_error_feedback`
(``C / (1 + omega)``), which the strategy does by default. ``scaled_sign`` is already contractive
and is the usual EF-signSGD choice.
"""

from lightning_gmc.compressors.ef_scaling import ScaledCompressor, scale_for_error_feedback
from lightning_gmc.compressors.quantizers.base import BitBudgetCompressor, GroupPlan, GroupQuantizer
from lightning_gmc.compressors.quantizers.dithering import NaturalDithering, RandomDithering
from lightning_gmc.compressors.quantizers.natural import (
    ElementPlan,
    NaturalCompression,
    natural_decode,
    natural_encode,
)
from lightning_gmc.compressors.quantizers.terngrad_sign import ScaledSign, TernGrad

__all__ = [
    "BitBudgetCompressor",
    "ElementPlan",
    "GroupPlan",
    "GroupQuantizer",
    "NaturalCompression",
    "NaturalDithering",
    "RandomDithering",
    "ScaledCompressor",
    "ScaledSign",
    "TernGrad",
    "natural_decode",
    "natural_encode",
    "scale_for_error_feedback",
]
