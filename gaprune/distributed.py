"""torchrun: one process per GPU (or several CPU processes), each taking its share of the batches.

Under ``torchrun --nproc_per_node N script.py ...`` the scripts call ``init_from_env``; every rank then
takes batches rank, rank + N, rank + 2N, ... (``World.shard``), accumulates its own sums, and the sums
are added across ranks once at the end, tensor by tensor (``World.sum_``), so memory stays one tensor
above a single process. Sums sharded across the ranks instead (``--accumulate_on sharded``) are reduced
onto their owner every step (``World.reduce_to``) and sent to rank 0 at the end (``World.to_main``).
Calibrated pruning shares its batches the same way, sums each layer's statistics across the ranks and
gives every rank rank 0's pruned weights (``World.broadcast_``). Rank 0 alone writes files and prints
results. Without torchrun nothing changes: ``World()`` is one rank
of one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

from gaprune.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_DIMS = 8  # of a tensor that World.to_main sends


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """Every ``size``-th item from ``rank``: the ranks' shares are disjoint and cover ``items``."""
        return list(items[self.rank::self.size])

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Add each tensor across ranks in place, one at a time (tensors on the CPU are sent as they are
        with gloo; with nccl they travel through the GPU one at a time)."""
        self._each(tensors, dist.all_reduce)

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give every rank rank 0's values of each tensor, in place, one at a time (as ``sum_`` sends them)."""
        self._each(tensors, lambda tensor: dist.broadcast(tensor, src=0))

    def _each(self, tensors: Iterable[torch.Tensor], collective: Callable[[torch.Tensor], object]) -> None:
        if not self.is_distributed:
            return
        on_gpu = dist.get_backend() == "nccl"
        for tensor in tensors:
            if on_gpu and tensor.device.type == "cpu":
                staged = tensor.cuda()
                collective(staged)
                tensor.copy_(staged)
            else:
                collective(tensor)

    def rounds(self, count: int) -> int:
        """Items of the busiest rank when ``count`` items are shared out by ``shard``."""
        return -(-count // self.size)

    def can_shard(self, device: torch.device) -> bool:
        """Whether sums on ``device`` can be reduced onto one rank: several ranks, on a backend for that device
        (nccl for CUDA tensors, gloo for CPU ones)."""
        return self.is_distributed and (dist.get_backend() == "nccl") == (device.type == "cuda")

    def reduce_to(self, contribution: torch.Tensor, owner: int) -> None:
        """Add ``contribution`` across ranks into rank ``owner``'s copy (the other ranks' copies become scratch)."""
        if self.is_distributed:
            dist.reduce(contribution, dst=owner)

    def to_main(self, tensor: torch.Tensor | None, owner: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | None:
        """Rank 0 gets the ``dtype`` tensor that rank ``owner`` holds (one it holds itself as it is; another rank's
        through ``device``, then into host memory); the other ranks get None. The owner sends the shape first."""
        if owner == 0:
            return tensor if self.is_main else None
        if self.rank == owner:
            header = torch.zeros(MAX_DIMS + 1, dtype=torch.int64, device=device)
            header[0] = tensor.dim()
            header[1:1 + tensor.dim()] = torch.tensor(tensor.shape)
            dist.send(header, dst=0)
            dist.send(tensor.to(device).contiguous(), dst=0)
        elif self.is_main:
            header = torch.empty(MAX_DIMS + 1, dtype=torch.int64, device=device)
            dist.recv(header, src=owner)
            dims = header.tolist()
            received = torch.empty(dims[1:1 + dims[0]], dtype=dtype, device=device)
            dist.recv(received, src=owner)
            return received.cpu()
        return None

    def most(self, value: int, device: torch.device) -> int:
        """The largest of every rank's ``value`` (sent through ``device``: a GPU with nccl)."""
        if not self.is_distributed:
            return value
        tensor = torch.tensor([value], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def contiguous_share(self, count: int) -> range:
        """This rank's block of ``count`` items shared out in order: the ranks' blocks are disjoint, cover the
        items, and each holds at most ``rounds(count)`` of them."""
        share = self.rounds(count)
        return range(min(count, self.rank * share), min(count, (self.rank + 1) * share))

    def gather_rows(self, compute: Callable[[int, int], torch.Tensor], count: int) -> torch.Tensor:
        """``compute(start, end)`` on this rank's contiguous share of ``count`` rows, then every rank's rows in
        order on every rank."""
        mine = self.contiguous_share(count)
        return self.gather_ragged(compute(mine.start, mine.stop))

    def gather_ragged(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's ``local`` rows (their counts may differ), concatenated in rank order, on every rank (each
        rank's rows padded to the longest for all_gather, the padding dropped)."""
        if not self.is_distributed:
            return local
        staged = local.cuda() if dist.get_backend() == "nccl" and local.device.type == "cpu" else local
        counts = [torch.zeros(1, dtype=torch.int64, device=staged.device) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([len(local)], device=staged.device))
        counts = [int(count.item()) for count in counts]
        padded = staged.new_zeros((max(counts), *local.shape[1:]))
        padded[:len(local)] = staged
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(local.device)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# How long a rank other than 0 waits before it prints a refusal (cli.run): torchrun stops every rank within
# a tenth of a second (its --monitor-interval) of rank 0's exit, so a refusal that rank 0 also met and
# printed is never printed twice, and one that was this rank's alone is still printed.
QUIET_RANK_WAIT_S = 3.0


def env_rank() -> int:
    """This process's rank: the process group's, else RANK from the environment (torchrun sets it before
    the group exists), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    except ValueError:  # a malformed WORLD_SIZE or RANK
        return 0


def reports_errors() -> bool:
    """Whether this process prints a refusal at once: every process outside torchrun, rank 0 under it."""
    return env_rank() == 0


_joined: World | None = None  # set by init_from_env: gaprune shares work only among ranks that asked for it
_initialised_here = False  # whether init_from_env created the process group (and shutdown may end it)


def warn_on_main(log: logging.Logger, lines: Iterable[str]) -> None:
    """Each line as a warning, once: on rank 0 under torchrun (every rank meets the same ones)."""
    if current_world().is_main:
        for line in lines:
            log.warning("%s", line)


def current_world() -> World:
    """The ranks init_from_env joined, else one process: a process group that someone else initialised
    (a user's own training script calling gaprune on one rank) never makes gaprune's calls collective."""
    return _joined if _joined is not None and dist.is_initialized() else World()


def init_from_env(device: str = "auto") -> World:
    """Join the process group torchrun describes in the environment (nccl on CUDA, each rank on GPU
    LOCAL_RANK; gloo on the CPU), or adopt one already initialised. Without torchrun: one process."""
    global _joined, _initialised_here
    if dist.is_available() and dist.is_initialized():
        _joined = World(dist.get_rank(), dist.get_world_size())
        return _joined
    if not launched_by_torchrun():
        return World()
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed; run without torchrun")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if max(local_rank + 1, local_size) > torch.cuda.device_count():  # every rank refuses, so rank 0 says it
            raise InputError(f"torchrun started more processes per node than there are GPUs "
                             f"({torch.cuda.device_count()}); lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    _initialised_here = True
    world = _joined = World(dist.get_rank(), dist.get_world_size())
    log.info("rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    if not world.is_main:  # one voice: the other ranks report only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    return world


def shutdown() -> None:
    """Leave the process group init_from_env joined (one the caller initialised is left to the caller)."""
    global _joined, _initialised_here
    if _initialised_here and dist.is_initialized():
        dist.destroy_process_group()
    _joined, _initialised_here = None, False
