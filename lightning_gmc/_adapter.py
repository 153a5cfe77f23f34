"""What the Lightning strategy and the Fabric strategy share: their GMC arguments (documentation and
the config built from them), argument checks, the registered strategy names, the node groups of
``hierarchy="node"``, the run summary line, the gradient-clipping policy, the messages both give, and
the names under which metrics are logged."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lightning_gmc.config import GMCConfig
from lightning_gmc.hook import GMCHookState, build_node_groups
from lightning_gmc.hook.hierarchy import check_topology
from lightning_gmc.hook.metrics import sum_over_ranks
from lightning_gmc.methods import METHODS, Method

__all__ = [
    "CHECKPOINT_KEY",
    "LOGGED_METRICS",
    "PROGRESS_BAR_METRICS",
    "RankLayout",
    "STRATEGY_NAMES",
    "check_ddp_keywords",
    "check_no_gradient_clipping",
    "check_node_layout",
    "document_gmc_arguments",
    "format_bytes",
    "gmc_config_and_state",
    "leave_swapped_points",
    "one_optimizer_error",
    "rank_aggregated_metrics",
    "register_strategy_names",
    "reject_conflicting_ddp_args",
    "run_summary",
    "set_up_node_groups",
    "warn_no_gmc_state",
]

log = logging.getLogger(__name__)

_Class = TypeVar("_Class", bound=type)

#: the key of the GMC state (every rank's residuals, the step, the learning-rate history) in a checkpoint
CHECKPOINT_KEY = "lightning_gmc"

#: per-rank metrics logged as ``gmc/<name>`` every step
LOGGED_METRICS = (
    "bytes_sent",
    "bytes_sent_inter",  # hierarchy="node" only (as are the next)
    "bytes_sent_intra",
    "dense_bytes",
    "bytes_sent_total",
    "dense_bytes_total",
    "rcc",
    "density",
    "residual_norm",
    "auto_density",  # density="auto" only (as are the next): the density chosen, 1 for the dense route
    "auto_link_bps",
    "auto_compute_ms",
)

#: shown in the progress bar unless the strategy's ``progress_bar_metrics=False``
PROGRESS_BAR_METRICS = ("rcc", "bytes_sent")

#: traffic summed over ranks at logging steps, logged as ``gmc/<name>_sum_ranks``
_TRAFFIC_SUMMED_OVER_RANKS = ("bytes_sent", "dense_bytes", "bytes_sent_total", "dense_bytes_total")

# DDP options that would install a second comm hook or bypass ours.
_CONFLICTING_DDP_ARGS = {
    "ddp_comm_hook": "the strategy installs its own DDP communication hook",
    "ddp_comm_state": "the strategy owns the hook state",
    "ddp_comm_wrapper": "wrapping the hook (e.g. fp16_compress_wrapper) would keep residuals in low "
    "precision; the hook already keeps state in fp32",
    "model_averaging_period": "post-local SGD model averaging replaces the gradient all-reduce GMC relies on",
    "mixed_precision": "DDP's native mixed_precision registers its own comm hook; use precision="
    "'bf16-mixed' instead",
}


#: the descriptions of the GMC arguments both strategies take (one per :class:`GMCConfig` field)
_GMC_ARGUMENTS_DOC = """\
compressor: compressor name (see ``lightning_gmc.COMPRESSORS``) or a :class:`Compressor`; None
    takes the method's default (``"topk"``; ``"none"`` for the dense ``method="dmsgd"``).
density: fraction of each parameter sent per step, in (0, 1] (sparsifiers); or ``"auto"``: the
    hook measures compute and link during the run and picks the density (and the dense route when
    compression does not pay) the cost model predicts fastest (``docs/planner.md``).
detach: GMC+'s detach coefficient (``> 0`` evaluates gradients at ``w - detach * lr *
    residual``); None takes the method's default (0 for GMC).
method: method name (see ``lightning_gmc.METHODS``).
momentum: overrides the optimizer's momentum when not None (not for ``ef``, whose optimizer
    keeps its own).
seed: seed of the shared random streams (RBGS blocks, random-k); equal on all ranks.
method_options: further options of the method (e.g. ``{"momentum_lr_convention": "cur"}``).
compressor_options: further options of the compressor (e.g. ``{"sample_ratio": 0.01}``).
ef_scaling: scale unbiased compressors (QSGD, natural, sparse dithering, ...) by
    ``1/(1+omega)`` so that error feedback gets the contractive compressor its analysis assumes;
    None (default) does so exactly for methods with error feedback (all but ``dmsgd``).
nonfinite: ``"skip"`` (a rank's non-finite bucket gradient counts as zero that step) or
    ``"raise"``; see :class:`~lightning_gmc.hook.GMCHookState`.
on_world_size_change: resuming a checkpoint written by a different number of workers (ranks, or
    nodes under ``hierarchy="node"``): ``"error"`` (default) or ``"reset_residuals"`` (keep the
    step, learning-rate history and global momentum; start every worker's residual from zero).
hierarchy: ``"flat"`` (default: every rank is a worker) or ``"node"``: the method runs between
    nodes only, with one worker per node (``num_nodes`` x ``devices`` of the Trainer or Fabric):
    inside a node a reduce-scatter averages the gradients, each rank runs the method on its
    shard (its state is 1/G of the node's) and an all-gather shares the update. For clusters
    whose links between nodes are much slower than inside them; needs at least 2 nodes with equal
    devices (``docs/nodes.md``, ``docs/algorithms.md`` 3.11).
wire_dtype: dtype the compressed values travel in, ``"fp32"`` (default), ``"bf16"`` or
    ``"fp16"``. Each rank's own rounding stays in its residual; a sum of 16-bit values over ranks
    is taken in fp32 and rounded once, and the remainder goes back into the residual of the rank
    that rounded it (EF21: its estimate), so nothing is lost; decoding accumulates in fp32
    (``docs/algorithms.md`` section 3.12). fp16: an overflow refuses the step on every rank, with
    every state as before it; bf16 cannot overflow.
auto_density: options of ``density="auto"`` (:class:`~lightning_gmc.config.AutoDensity` or a dict
    of its fields): ``min_density`` / ``max_density`` (default 0.01 / 0.1), ``comm_fraction`` (a
    target share of compute time for communication), ``interval`` (steps between decisions,
    default 1000), ``pin`` (a fixed density or ``"none"``), ``profile`` (device costs).
"""

_GMC_ARGUMENTS_PLACEHOLDER = "{gmc_arguments}"


def document_gmc_arguments(cls: _Class) -> _Class:
    """Class decorator: replace the docstring line ``{gmc_arguments}`` by the GMC arguments'
    descriptions, indented as that line (one text for both strategies; ``help()``, Sphinx and
    LightningCLI's ``--help`` read the result)."""
    lines = (cls.__doc__ or "").splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.strip() == _GMC_ARGUMENTS_PLACEHOLDER:
            indent = line[: len(line) - len(line.lstrip())]
            lines[index] = textwrap.indent(_GMC_ARGUMENTS_DOC, indent)
            cls.__doc__ = "".join(lines)
            return cls
    raise TypeError(f"{cls.__name__}'s docstring has no line {_GMC_ARGUMENTS_PLACEHOLDER}")


def gmc_config_and_state(
    owner: type, arguments: Mapping[str, Any], ddp_kwargs: dict[str, Any]
) -> tuple[GMCConfig, GMCHookState]:
    """The validated config and the hook state of a strategy's constructor arguments.

    ``arguments`` holds one value per :class:`GMCConfig` field under the field's name (the strategy's
    ``locals()`` as its ``__init__`` starts; its signature lists them with types and defaults, so that
    users and LightningCLI read them); option dicts given as None are empty. ``ddp_kwargs`` (the
    strategy's ``**ddp_kwargs``) may hold only :class:`~torch.nn.parallel.DistributedDataParallel`'s
    arguments: a misspelt strategy argument fails here, in the constructor, not inside DDP at fit time.
    """
    reject_conflicting_ddp_args(owner.__name__, ddp_kwargs)
    check_ddp_keywords(owner, ddp_kwargs)
    values = {field.name: arguments[field.name] for field in dataclasses.fields(GMCConfig)}
    for name in ("method_options", "compressor_options"):
        values[name] = values[name] or {}
    config = GMCConfig(**values)
    return config, GMCHookState.from_config(config, ddp_kwargs.get("process_group"))


def reject_conflicting_ddp_args(owner: str, ddp_kwargs: dict[str, Any]) -> None:
    """Remove the DDP arguments LightningCLI passes as None; raise for any that is set."""
    for key, reason in _CONFLICTING_DDP_ARGS.items():
        if ddp_kwargs.pop(key, None) is not None:
            raise ValueError(f"{owner} does not accept `{key}`: {reason}. Remove the argument.")


def _ddp_argument_names() -> list[str]:
    """The keyword arguments of this torch's ``DistributedDataParallel.__init__`` (not ``module``)."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters.values()
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in keyword_kinds and p.name not in ("self", "module")]


def _own_argument_names(owner: type) -> list[str]:
    parameters = inspect.signature(owner.__init__).parameters.values()  # type: ignore[misc]
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in keyword_kinds and p.name != "self"]


def check_ddp_keywords(owner: type, ddp_kwargs: Mapping[str, Any]) -> None:
    """Raise a TypeError for a keyword that is neither the strategy's nor ``DistributedDataParallel``'s.

    The valid DDP names come from the installed torch's ``DistributedDataParallel.__init__`` signature,
    so every DDP argument still passes; the error names the closest valid name (``densty`` ->
    ``density``) and both lists.
    """
    ddp_names = _ddp_argument_names()
    unknown = [key for key in ddp_kwargs if key not in ddp_names]
    if not unknown:
        return
    own = _own_argument_names(owner)
    key = unknown[0]
    close = difflib.get_close_matches(key, own + ddp_names, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise TypeError(
        f"{owner.__name__} got an unexpected keyword argument {key!r}.{hint} Its own arguments: "
        f"{', '.join(own)}; any other keyword goes to torch.nn.parallel.DistributedDataParallel, which "
        f"takes: {', '.join(ddp_names)}."
    )


#: the strategy names both the Trainer and Fabric register: (name, description, init arguments); one
#: name per further method follows (:func:`strategy_names`)
STRATEGY_NAMES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("gmc", "GMC: top-k compression with error feedback and global momentum", {}),
    (
        "gmc_plus",
        "GMC+: RBGS compression, gradients at the detached point (detach=0.5)",
        {"compressor": "rbgs", "detach": 0.5},
    ),
    ("ef", "EF: top-k with error feedback on the gradient, any optimizer (Adam, AdamW)", {"method": "ef"}),
)


def strategy_names() -> list[tuple[str, str, dict[str, Any]]]:
    """:data:`STRATEGY_NAMES`, then one name per registered method that has none there."""
    named = list(STRATEGY_NAMES)
    taken = {name for name, _, _ in named} | {args.get("method", "gmc") for _, _, args in named}
    for name in sorted(METHODS):
        if name not in taken:
            named.append((name, f"lightning_gmc method {name!r}", {"method": name}))
    return named


def register_strategy_names(cls: type, strategy_registry: Any) -> None:
    """Register :func:`strategy_names` for ``cls`` (the Trainer's or Fabric's registry; not DDP's own
    names, which are taken)."""
    for name, description, init_arguments in strategy_names():
        strategy_registry.register(name, cls, description=description, override=True, **init_arguments)


def one_optimizer_error(owner: str, method: Method, found: str) -> ValueError:
    """The error for anything but exactly one optimizer; ``found`` says what the user configured."""
    kind = "torch.optim.SGD" if method.takes_over_optimizer else "any torch.optim.Optimizer"
    return ValueError(
        f"{owner} supports exactly one optimizer ({kind} for method {method.name!r}); {found}. Use one "
        f"optimizer with several param groups (each may have its own lr, momentum and weight decay)."
    )


def warn_no_gmc_state() -> None:
    """A checkpoint with optimizer state but no GMC block: training goes on from zero residuals."""
    log.warning(
        "lightning_gmc: the checkpoint has no GMC state (written by another strategy?); residuals "
        "and momentum start from zero"
    )


def leave_swapped_points(state: GMCHookState) -> None:
    """Put the training parameters back (from a detached or evaluation point an error left behind)."""
    state.exit_detached_point()
    state.exit_evaluation_point()


def format_bytes(count: float) -> str:
    """``808 B``, ``1.2 kB``, ``35.7 MB``: decimal units, as network rates are given."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < (999.5 if unit == "B" else 999.95):  # what would not print as 1000
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


class RankLayout(Protocol):
    """Where this process sits, as a DDP strategy (Trainer's or Fabric's) has it from its cluster
    environment and its ``num_nodes`` / ``devices``."""

    @property
    def num_nodes(self) -> int: ...

    @property
    def num_processes(self) -> int: ...

    @property
    def node_rank(self) -> int: ...

    @property
    def local_rank(self) -> int: ...

    @property
    def root_device(self) -> torch.device: ...


def set_up_node_groups(state: GMCHookState, strategy: RankLayout) -> None:
    """``hierarchy="node"``: build the intra- and inter-node process groups from the strategy's node
    count and devices per node (a collective: call on every rank once the default process group
    exists, before ``state.attach``). Nothing to do for ``"flat"`` or when the groups are set.

    Raises (on every rank alike):
        ValueError: unequal ranks per node or a single node (:func:`check_topology`).
        RuntimeError: ranks not numbered node by node (:func:`check_node_layout`).
    """
    if state.hierarchy != "node" or state.node_groups is not None:
        return
    ranks_per_node, num_nodes = strategy.num_processes, strategy.num_nodes
    check_topology(dist.get_world_size(), ranks_per_node, num_nodes)
    check_node_layout(_every_rank_position(strategy), ranks_per_node)
    state.set_node_groups(build_node_groups(ranks_per_node, num_nodes))


def _every_rank_position(strategy: RankLayout) -> list[tuple[int, int]]:
    """(node rank, local rank) of every rank, by global rank: one small all-gather, so that a bad
    layout stops every rank with the same error instead of the ranks it concerns only."""
    device = strategy.root_device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([strategy.node_rank, strategy.local_rank], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [(int(position[0]), int(position[1])) for position in every]


def check_node_layout(positions: Sequence[tuple[int, int]], ranks_per_node: int) -> None:
    """Raise unless rank ``r`` is local rank ``r % G`` of node ``r // G`` (``positions[r]`` is what the
    cluster environment says of rank ``r``): the node groups are built by that rule."""
    for rank, (node_rank, local_rank) in enumerate(positions):
        by_rule = divmod(rank, ranks_per_node)
        if (node_rank, local_rank) != by_rule:
            raise RuntimeError(
                f"hierarchy='node': rank {rank} is node {node_rank}, local rank {local_rank} for "
                f"Lightning, but node {by_rule[0]}, local rank {by_rule[1]} by rank = node_rank * "
                f"devices + local_rank; the launcher numbers ranks differently. Use hierarchy='flat'."
            )


def run_summary(config: GMCConfig, state: GMCHookState) -> str:
    """One line with the effective configuration (defaults resolved), logged on rank 0 at fit start.

    Every :class:`GMCConfig` field appears, so a registered strategy name or a command-line override
    that replaced a setting shows up in the line.
    """
    method = state.method
    detach = getattr(method, "detach", None)
    binding = state.binding
    effective = {
        "method": config.method_name,
        "compressor": repr(method.compressor),
        "density": config.density
        if config.auto is None
        else f"auto (starting at {config.initial_density:g})",
        "detach": "n/a" if detach is None else detach,
    }
    rest = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name not in effective and field.name != "compressor_options"
    }
    parts = [f"{key}={value}" for key, value in {**effective, **rest}.items()]
    if method.takes_over_optimizer:
        parts.append(f"momentum per group={binding.group_momentum}")
        parts.append(f"weight_decay per group={binding.group_weight_decay}")
    return "lightning_gmc: " + ", ".join(parts)


def check_no_gradient_clipping(state: GMCHookState, what: str) -> None:
    """Reject gradient clipping for methods whose hook writes the update direction into ``.grad``.

    Such a method has already applied momentum, error feedback and weight decay when the optimizer
    (and anything clipping before it) sees ``.grad``, so clipping there bounds the update direction,
    not the gradient, and the method's state never sees the clipped value: the run would differ from
    clipping under DDP without saying so.
    """
    method = state.method
    if not method.takes_over_optimizer:
        return  # the optimizer steps on the averaged gradient: clipping acts as under DDP
    leaves_optimizer = sorted(name for name, cls in METHODS.items() if not cls.takes_over_optimizer)
    alternative = (
        f"a method whose update your own optimizer applies ({', '.join(map(repr, leaves_optimizer))}), "
        "where clipping acts on the averaged gradient as under DDP, or "
        if leaves_optimizer
        else ""
    )
    raise ValueError(
        f"{what} is not supported with method {method.name!r}: its communication hook replaces each "
        "gradient with the method's update direction (momentum, residual and weight decay applied), so "
        "clipping would bound that direction, not the gradient, and the method's state would never see "
        f"the clipped value. Remove the clipping, or use {alternative}DDPStrategy for clipped "
        "training."
    )


def logged_metrics(metrics: Mapping[str, float], names: tuple[str, ...]) -> dict[str, float]:
    """``gmc/<name>`` for the given metric names that are present."""
    return {f"gmc/{name}": float(metrics[name]) for name in names if name in metrics}


def rank_aggregated_metrics(
    metrics: Mapping[str, float], process_group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, float]:
    """Traffic summed over ranks (``gmc/<name>_sum_ranks``) and the skipped non-finite buckets of all
    ranks (``gmc/nonfinite_skips``), from one all-reduce: a collective, call it on every rank at the
    same step."""
    names = (*_TRAFFIC_SUMMED_OVER_RANKS, "nonfinite_skips")
    summed = sum_over_ranks({name: metrics.get(name, 0.0) for name in names}, process_group, device)
    out = {f"gmc/{name}_sum_ranks": summed[name] for name in _TRAFFIC_SUMMED_OVER_RANKS}
    out["gmc/nonfinite_skips"] = summed["nonfinite_skips"]
    return out
