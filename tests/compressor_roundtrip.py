"""One compress -> decompress round trip of a compressor, shared by the quantizer tests."""

from __future__ import annotations

import torch


def decode(compressor, x, segments, rng, step=0):
    """Compress ``x`` with a plan for ``segments``, decode the payload into zeros; return
    ``(decoded, plan, payload)``."""
    plan = compressor.plan(segments)
    payload = compressor.compress(x, plan, rng, step)
    out = torch.zeros_like(x)
    compressor.decompress_add(payload, plan, out)
    return out, plan, payload
