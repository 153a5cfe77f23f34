"""Layer 4: the DDP communication hook and its per-rank state, usable without Lightning.

Plain DDP (or Fabric, via ``model._forward_module``)::

    import torch, lightning_gmc
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    state = lightning_gmc.GMCHookState.from_config(lightning_gmc.GMCConfig(compressor="topk", density=0.01))
    state.attach(model, optimizer)        # takes over momentum and weight decay (see below)
    ddp.register_comm_hook(state, lightning_gmc.gmc_hook)
    for x, y in loader:
        with state.detached_point():      # GMC+ / DEF-A only; a no-op for GMC
            loss = loss_fn(ddp(x), y)
            loss.backward()
        optimizer.step(); optimizer.zero_grad()
    # checkpoint: every rank calls state.gathered_state_dict(); rank 0 saves it with the model and
    # optimizer.state_dict(); on resume every rank calls state.load_state_dict(saved) after attach().

Pieces (one file each): :mod:`~lightning_gmc.hook.binding` (optimizer takeover, its guard, the step
clock), :mod:`~lightning_gmc.hook.swap` (detached and evaluation points), :mod:`~lightning_gmc.hook.codec`
(checkpoint format), :mod:`~lightning_gmc.hook.state` (:class:`GMCHookState`),
:mod:`~lightning_gmc.hook.ddp_hook` (:func:`gmc_hook`), :mod:`~lightning_gmc.hook.reducer` (one bucket
in, its direction out; the flat reducer) and, for ``hierarchy="node"``,
:mod:`~lightning_gmc.hook.hierarchy` (topology, process groups), :mod:`~lightning_gmc.hook.node_reducer`
(the sharded 2-D reducer) and :mod:`~lightning_gmc.hook.node_checkpoint` (checkpoints across
topologies).

Tuning guide:

* ``density``: fraction of each parameter sent per step. The GMC paper's top-k runs are consistent
  with 0.25-0.3 %; RBGS with GMC+ tolerates far lower densities than plain error feedback. Top-k via
  all-gather only saves bytes while ``density < 1/K`` (K ranks); past that a bucket automatically
  falls back to a dense all-reduce of the compressed vector (same maths, fewer bytes).
* ``rbgs`` is all-reduce compatible and costs O(k) to select, so it is the compressor that pays off on
  fast links; exact ``topk`` is the accuracy reference and slow on large tensors, ``topk_approx`` is
  the practical top-k.
* Momentum and weight decay move from the optimizer into the method: ``attach`` records each param
  group's ``momentum`` and ``weight_decay`` and sets them to zero in the optimizer, whose step then is
  plain SGD with the scheduled learning rate. Coupled L2 is added to the gradient before compression.
  ``optimizer.state_dict()`` still saves the user's values, so a checkpoint resumes under plain DDP
  with them; loading a state dict takes them over again.
* ``method="ef"`` is the exception: error feedback on the gradient alone, with any optimizer (Adam,
  AdamW, Nesterov SGD, ...) left in charge of momentum, weight decay and adaptive scaling.

State (residuals, global momentum) is kept in fp32 per parameter, whatever the parameter dtype, and
survives DDP's bucket rebuild after the first iteration.
"""

from lightning_gmc.config import NonFinitePolicy
from lightning_gmc.hook.binding import OptimizerBinding, StepClock
from lightning_gmc.hook.codec import STATE_FORMAT
from lightning_gmc.hook.ddp_hook import gmc_hook
from lightning_gmc.hook.hierarchy import NodeGroups, NodeTopology, build_node_groups
from lightning_gmc.hook.state import GMCHookState
from lightning_gmc.hook.swap import ParameterSwap

__all__ = [
    "STATE_FORMAT",
    "GMCHookState",
    "NodeGroups",
    "NodeTopology",
    "NonFinitePolicy",
    "OptimizerBinding",
    "ParameterSwap",
    "StepClock",
    "build_node_groups",
    "gmc_hook",
]
