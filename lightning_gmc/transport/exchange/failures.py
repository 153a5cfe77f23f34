"""How the exchange names what failed: a collective that did not complete, a 16-bit sum out of range."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.futures import Future

from lightning_gmc.methods import Message

__all__ = ["CollectiveFailure", "WireOverflow", "check_fp16_range", "failure", "wait_or_fail"]


class CollectiveFailure(RuntimeError):
    """A collective of the exchange failed (typically a peer process died or timed out)."""


class WireOverflow(FloatingPointError):
    """A sum or a value sent in fp16 was beyond +-65504: every rank refuses the step alike."""


def failure(what: str, where: str, err: Exception) -> CollectiveFailure:
    """The error of a failed collective: which one (``what``), of which bucket and step (``where``)."""
    return CollectiveFailure(
        f"lightning_gmc: the {what} of {where} failed; no update was applied (a peer process "
        f"probably died or timed out): {err}"
    )


def wait_or_fail(future: Future[Tensor], what: str, where: str) -> Tensor:
    """Wait for a collective in the caller's thread; a failure raises :class:`CollectiveFailure`."""
    try:
        return future.wait()
    except Exception as err:
        raise failure(what, where, err) from err


def check_fp16_range(mean: Tensor, message: Message, where: str) -> None:
    """fp16 values beyond +-65504 become infinite on the wire: refuse the step on every rank (every
    rank decodes the same mean) instead of applying them. A host sync, only for ``wire_dtype="fp16"``."""
    if not bool(torch.isfinite(mean).all()):
        raise WireOverflow(
            f"lightning_gmc: {message.compressor.describe()} overflowed fp16 on the wire in {where} (a value "
            f"or a sum over ranks beyond +-65504); the step was refused: no update was applied and the "
            f"method's state, step counter and traffic totals are as before it. Use wire_dtype='bf16' (the "
            f"range of fp32) or 'fp32'."
        )
