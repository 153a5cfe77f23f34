"""The exchange: one implementation of routing, payload packing and traffic accounting.

Every message of a bucket goes through :meth:`Exchange.start`, in the DDP hook (one local worker,
:class:`~lightning_gmc.transport.collectives.TorchCollectives`) and in the simulator (K local
workers, :class:`~lightning_gmc.transport.collectives.InProcessCollectives`), so the two compute
the same thing by construction. Each route (``transport/routing.py`` chooses it) is one small object
in :mod:`~lightning_gmc.transport.exchange.routes`.

Ordering and failures:

* Every collective is issued in the caller's thread, in message order, when :meth:`Exchange.start`
  is called (the DDP hook body, in bucket order). Only local decoding runs when the collectives
  complete: issuing a collective from a future's callback runs it on gloo's completion thread, and
  different ranks then issue collectives in different orders.
* A failed collective (a dead peer, a timeout) fails the returned future with a
  :class:`CollectiveFailure` naming the collective, the message, the bucket and the step. Every
  collective's result is checked before anything is decoded, so nothing stale is ever decoded or
  applied.
* Summing routes add in rank order where it matters (16-bit values always; fp32 with ``K >= 3`` for
  sparse supports, and for dense vectors in deterministic mode):
  :mod:`~lightning_gmc.transport.exchange.ordered`.
* ``wire_dtype="fp16"``: an overflow raises :class:`WireOverflow` from :meth:`Exchange.start` itself,
  on every rank at the same bucket.
"""

from lightning_gmc.transport.exchange.core import Exchange, Means
from lightning_gmc.transport.exchange.failures import CollectiveFailure, WireOverflow

__all__ = ["CollectiveFailure", "Exchange", "Means", "WireOverflow"]
