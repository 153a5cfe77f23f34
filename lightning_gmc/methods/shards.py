"""Sharding the model over the G ranks of a node (``hierarchy="node"``, ``docs/algorithms.md`` 3.11).

Under the node hierarchy every local rank runs the method on its own part of every DDP bucket: the
*shard plan* says, once and for the whole run, which local rank owns which elements of the model.

:func:`plan_shards` is one pure function of the parameter table and G, used by the DDP reducer, the
in-process :class:`~lightning_gmc.HierarchicalSimulator` and the documentation:

* a parameter of at least ``G * min_piece`` elements is **split** into G contiguous pieces of
  near-equal size (the first ``numel % G`` pieces one element longer); piece ``l`` belongs to local
  rank ``l``;
* a smaller parameter stays **whole** and goes to the local rank with the fewest elements so far
  (ties: the lowest local rank), in parameter order. Loads then differ by at most one whole parameter
  at every point of the parameter order, so every bucket that is a run of consecutive parameters
  (DDP's buckets are) is balanced up to the whole parameters it holds.

The plan never depends on DDP's buckets, so the bucket rebuild after the first iteration never moves
state between ranks. Pieces are the compressor's segments (selection is per segment, ``docs/
algorithms.md`` 3.6): ``min_piece`` keeps small parameters (biases, norms) whole, so that a sparsifier
never selects from a handful of elements. Each piece has its own randomness key: a whole parameter
keeps its index (a plan without split parameters then draws exactly what a flat run of the same
workers draws), the pieces of a split parameter get keys beyond the table's indices.

A rank's method state covers its pieces only, in a :class:`~lightning_gmc.methods.ParameterTable` of
those pieces (:meth:`ShardPlan.local_table`), named ``fqn`` (whole) or ``fqn[start:stop]`` (a piece
of the flattened parameter). :meth:`ShardPlan.merge_buffers` and :meth:`ShardPlan.split_buffers`
convert between those shards and full per-parameter tensors (checkpoints hold the latter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_gmc.methods.base import ParameterTable

__all__ = ["DEFAULT_MIN_PIECE", "BucketShards", "Piece", "ShardPlan", "plan_shards"]

#: Smallest piece a split parameter is cut into (elements): parameters below ``G * 2048`` elements
#: stay whole. Top-k at 1 % still selects 20 coordinates of a piece, and a whole parameter (below
#: 64 KiB of fp32 at G = 8) is small against DDP's buckets (1 MiB first bucket, 25 MiB after): under
#: DDP's default caps every bucket of at least ``4 G min_piece`` elements of ResNet-20/50, the ViT and
#: GPT-2 has its largest shard within 1.12x of the mean (``tests/methods/test_shards.py``).
DEFAULT_MIN_PIECE = 2048


@dataclass(frozen=True)
class Piece:
    """A contiguous range of one parameter's flattened elements, owned by one local rank.

    Attributes:
        param: the parameter's index in the model's table.
        start: first element (of the flattened parameter).
        stop: one past the last element.
        owner: the local rank that runs the method on it.
        key: its compressor segment's randomness key.
        name: ``fqn`` for a whole parameter, ``fqn[start:stop]`` for a piece of a split one.
    """

    param: int
    start: int
    stop: int
    owner: int
    key: int
    name: str

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    """Which local rank owns which elements of the model (module docstring); built by :func:`plan_shards`.

    Attributes:
        table: the model's parameters.
        ranks_per_node: G.
        min_piece: the smallest piece of a split parameter.
        pieces: every piece, in parameter order (a split parameter's pieces in element order).
    """

    table: ParameterTable
    ranks_per_node: int
    min_piece: int
    pieces: tuple[Piece, ...]
    _by_param: tuple[tuple[int, ...], ...] = field(repr=False, compare=False)
    _local: tuple[tuple[int, ...], ...] = field(repr=False, compare=False)
    _position: tuple[int, ...] = field(repr=False, compare=False)

    def param_pieces(self, param: int) -> tuple[int, ...]:
        """Indices (into :attr:`pieces`) of one parameter's pieces, in element order."""
        return self._by_param[param]

    def local_pieces(self, rank: int) -> tuple[int, ...]:
        """Indices of the pieces local rank ``rank`` owns, in plan order (its table's order)."""
        return self._local[rank]

    def position(self, piece: int) -> int:
        """Where a piece sits in its owner's :meth:`local_table`."""
        return self._position[piece]

    @property
    def split_params(self) -> tuple[int, ...]:
        """Indices of the parameters that are split into G pieces."""
        return tuple(p for p, ids in enumerate(self._by_param) if len(ids) > 1)

    def local_numel(self, rank: int) -> int:
        """Elements local rank ``rank`` owns (its share of the model)."""
        return sum(self.pieces[i].numel for i in self._local[rank])

    @property
    def largest_share(self) -> int:
        """Elements of the largest local rank's share of the model: the chunk of an all-gather of a
        whole-model buffer inside the node (the residual of a detached point)."""
        return max(self.local_numel(rank) for rank in range(self.ranks_per_node))

    def local_table(self, rank: int) -> ParameterTable:
        """The table of the pieces ``rank`` owns: whole parameters keep their shape, pieces are flat."""
        table = self.table
        names, shapes, groups, keys = [], [], [], []
        for index in self._local[rank]:
            piece = self.pieces[index]
            whole = len(self._by_param[piece.param]) == 1
            names.append(piece.name)
            shapes.append(table.shapes[piece.param] if whole else torch.Size([piece.numel]))
            groups.append(table.groups[piece.param])
            keys.append(piece.key)
        return ParameterTable(tuple(names), tuple(shapes), tuple(groups), tuple(keys))

    def bucket(self, param_indices: Sequence[int]) -> BucketShards:
        """The shard-major layout of a DDP bucket holding these parameters (in bucket order)."""
        return BucketShards(self, tuple(param_indices))

    def split_buffers(
        self, full: Mapping[str, Mapping[str, Tensor]], rank: int
    ) -> dict[str, dict[str, Tensor]]:
        """Full per-parameter tensors (``{buffer: {fqn: tensor}}``, a checkpoint's) -> the pieces
        ``rank`` owns, by piece name (what :meth:`WorkerState.load_state_dict` of its table takes)."""
        out: dict[str, dict[str, Tensor]] = {}
        for buffer, by_name in full.items():
            shard = {}
            for index in self._local[rank]:
                piece = self.pieces[index]
                fqn = self.table.names[piece.param]
                if fqn not in by_name:
                    raise ValueError(
                        f"{buffer!r} has no tensor for parameter {fqn!r} (a checkpoint of another model?)"
                    )
                tensor = by_name[fqn]
                if len(self._by_param[piece.param]) == 1:
                    shard[piece.name] = tensor
                else:
                    shard[piece.name] = tensor.reshape(-1)[piece.start : piece.stop]
            out[buffer] = shard
        return out

    def merge_buffers(
        self, shards: Sequence[Mapping[str, Mapping[str, Tensor]]]
    ) -> dict[str, dict[str, Tensor]]:
        """The G local ranks' shards (``shards[l]`` = ``{buffer: {piece name: tensor}}``, local rank
        order) -> full per-parameter tensors ``{buffer: {fqn: tensor}}``."""
        if len(shards) != self.ranks_per_node:
            raise ValueError(f"expected the shards of {self.ranks_per_node} local ranks, got {len(shards)}")
        out: dict[str, dict[str, Tensor]] = {}
        for buffer in shards[0]:
            full = {}
            for param, ids in enumerate(self._by_param):
                parts = []
                for index in ids:
                    piece = self.pieces[index]
                    owned = shards[piece.owner].get(buffer, {})
                    if piece.name not in owned:
                        raise ValueError(
                            f"local rank {piece.owner}'s shard of {buffer!r} has no {piece.name!r}; shards "
                            f"of another plan (another ranks_per_node or min_piece)?"
                        )
                    parts.append(owned[piece.name].reshape(-1))
                shape = self.table.shapes[param]
                full[self.table.names[param]] = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(
                    shape
                )
            out[buffer] = full
        return out


def plan_shards(table: ParameterTable, ranks_per_node: int, min_piece: int = DEFAULT_MIN_PIECE) -> ShardPlan:
    """The shard plan of ``table`` over ``ranks_per_node`` local ranks (module docstring).

    Raises:
        ValueError: ``ranks_per_node`` or ``min_piece`` below 1.
    """
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    if min_piece < 1:
        raise ValueError(f"min_piece must be >= 1, got {min_piece}")
    count = len(table)
    loads = [0] * ranks_per_node
    pieces: list[Piece] = []
    by_param: list[tuple[int, ...]] = []
    for param, (name, numel) in enumerate(zip(table.names, table.numels, strict=True)):
        first = len(pieces)
        if ranks_per_node > 1 and numel >= ranks_per_node * min_piece:
            base, extra = divmod(numel, ranks_per_node)
            start = 0
            for rank in range(ranks_per_node):
                stop = start + base + (1 if rank < extra else 0)
                key = count + param * ranks_per_node + rank  # beyond every whole parameter's index
                pieces.append(Piece(param, start, stop, rank, key, f"{name}[{start}:{stop}]"))
                loads[rank] += stop - start
                start = stop
        else:
            owner = min(range(ranks_per_node), key=loads.__getitem__)
            pieces.append(Piece(param, 0, numel, owner, param, name))
            loads[owner] += numel
        by_param.append(tuple(range(first, len(pieces))))
    local: list[list[int]] = [[] for _ in range(ranks_per_node)]
    position = []
    for index, piece in enumerate(pieces):
        position.append(len(local[piece.owner]))
        local[piece.owner].append(index)
    return ShardPlan(
        table,
        ranks_per_node,
        min_piece,
        tuple(pieces),
        tuple(by_param),
        tuple(tuple(ids) for ids in local),
        tuple(position),
    )


class BucketShards:
    """One DDP bucket laid out shard-major: local rank ``l``'s pieces of the bucket, in bucket order,
    form chunk ``l`` of ``chunk`` elements (the largest shard; shorter ones are zero-padded), so that
    one reduce-scatter leaves each rank the node's sum of its shard and one all-gather brings every
    shard back.

    Adjacent pieces of one owner move as one run, so packing and unpacking cost one concatenation
    per rank and one for the bucket.

    Args:
        plan: the shard plan.
        param_indices: the bucket's parameters in bucket order.
    """

    def __init__(self, plan: ShardPlan, param_indices: tuple[int, ...]) -> None:
        self.plan = plan
        self.param_indices = param_indices
        ranks = plan.ranks_per_node
        numels = plan.table.numels
        shard_pieces: list[list[int]] = [[] for _ in range(ranks)]
        # Where each piece's parameter sits in the bucket (for reading parameter values).
        self._read_spans: list[list[tuple[int, int, int]]] = [[] for _ in range(ranks)]
        runs: list[tuple[int, int]] = []  # (owner, size) in bucket order
        for position, param in enumerate(param_indices):
            for index in plan.param_pieces(param):
                piece = plan.pieces[index]
                shard_pieces[piece.owner].append(index)
                self._read_spans[piece.owner].append((position, piece.start, piece.stop))
                if runs and runs[-1][0] == piece.owner:
                    runs[-1] = (piece.owner, runs[-1][1] + piece.numel)
                else:
                    runs.append((piece.owner, piece.numel))
        self.numel = sum(numels[p] for p in param_indices)
        self.shard_pieces = tuple(tuple(ids) for ids in shard_pieces)
        self.shard_numels = tuple(sum(plan.pieces[i].numel for i in ids) for ids in shard_pieces)
        #: the chunk every rank sends and receives: the largest shard of the bucket
        self.chunk = max(self.shard_numels)
        self.run_sizes = [size for _, size in runs]
        # Per rank, the bucket-order indices of its runs (packing concatenates them into its chunk).
        self._rank_runs: list[list[int]] = [[] for _ in range(ranks)]
        for run, (owner, _) in enumerate(runs):
            self._rank_runs[owner].append(run)
        self._starts: dict[int, list[int]] = {}

    def local_positions(self, rank: int) -> tuple[int, ...]:
        """Positions in ``rank``'s local table of its pieces of this bucket, in shard order (the key of
        its :class:`~lightning_gmc.methods.BucketState`)."""
        return tuple(self.plan.position(i) for i in self.shard_pieces[rank])

    def pack(self, grad: Tensor, send: Tensor) -> None:
        """Write the bucket-ordered ``grad`` shard-major into ``send[: G * chunk]`` (padding zeroed;
        ``send`` may have another dtype)."""
        parts = grad.split(self.run_sizes)
        chunk = self.chunk
        for rank, run_ids in enumerate(self._rank_runs):
            base, size = rank * chunk, self.shard_numels[rank]
            if run_ids:
                torch.cat([parts[i] for i in run_ids], out=send[base : base + size])
            if size < chunk:
                send[base + size : base + chunk].zero_()

    def unpack(self, gathered: Tensor, stride: int, out: Tensor) -> None:
        """The inverse of :meth:`pack` after an all-gather: ``gathered`` holds rank ``l``'s shard at
        ``l * stride`` (``stride >= chunk``: padding and any trailer follow it); write the bucket into
        ``out`` in bucket order."""
        starts = self._starts.get(stride)
        if starts is None:
            starts = [0] * len(self.run_sizes)
            for rank, run_ids in enumerate(self._rank_runs):
                offset = rank * stride
                for run in run_ids:
                    starts[run] = offset
                    offset += self.run_sizes[run]
            self._starts[stride] = starts
        views = [gathered[start : start + size] for start, size in zip(starts, self.run_sizes, strict=True)]
        torch.cat(views, out=out)

    def read_params(self, rank: int, params: Sequence[Tensor], out: Tensor) -> None:
        """Fill ``out`` with ``rank``'s shard of the parameter values (fp32, shard order); ``params``
        are the bucket's parameters in bucket order."""
        parts = [
            params[position].detach().reshape(-1)[start:stop].to(torch.float32)
            for position, start, stop in self._read_spans[rank]
        ]
        torch.cat(parts, out=out)

    def read_flat(self, rank: int, flat: Sequence[Tensor], out: Tensor) -> None:
        """As :meth:`read_params`, from per-parameter flat tensors of the whole model (``flat[p]``
        for parameter ``p``: the simulator's)."""
        parts = [
            flat[self.param_indices[position]][start:stop] for position, start, stop in self._read_spans[rank]
        ]
        torch.cat(parts, out=out)
