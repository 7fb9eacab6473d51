"""How --exact's partial sums travel between the ranks: every rank ends with the whole tree's sum, added in
the tree's fixed order, whatever the transport (exact.py says why the order must not move).

- CPU ranks on one host: through shared memory (`host_allreduce`'s block): every rank's partial sum is
  copied in, and each rank adds the tree's top levels itself (memory, not a link, carries the bytes).
- Anywhere else: a reduce-scatter by recursive halving, then an all-gather by recursive doubling, over
  point-to-point sends of the process group (gloo, nccl). W is a power of two (it divides --pieces, a power
  of two). At level k rank r pairs with r xor 2**k: both hold the sums of two sibling subtrees (k levels
  above the ranks' own) over the same range of elements; the one whose bit k is 0 holds the left subtree.
  Each keeps half of the range (the left one the lower half), receives the sibling's values for it and adds
  left + right: the tree's own addition at that node. An addition of two floats is exactly rounded, so each
  element's bits depend on its two operands alone, and after log2(W) levels each rank holds the tree's sum
  of 1/W of the elements, bit for bit one process's. The all-gather then moves bytes only.

Bytes each rank sends per step: N/2 + N/4 + ... + N/W in each phase, 2(W-1)/W * N in all (N the row's
bytes), the ring bound that nccl-tests' bus bandwidth rests on; gathering the W partial sums instead sent
(W-1) * N (3x the row at 4 ranks, 7x at 8).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from . import host_allreduce
from .host_allreduce import HostAllReduce

Range = tuple[int, int]


class HalvingDoubling:
    """The tree's sum of every rank's row, on every rank, by recursive halving and doubling."""

    def __init__(self, rank: int, world_size: int, numel: int, device: torch.device):
        assert world_size & (world_size - 1) == 0, "--exact's world size divides a power of two"
        self.levels: list[tuple[int, Range, Range, bool]] = []  # (partner, kept range, given range, holds the left)
        lo, hi = 0, numel
        for k in range(world_size.bit_length() - 1):
            mid, left = (lo + hi) // 2, not rank >> k & 1
            kept, given = ((lo, mid), (mid, hi)) if left else ((mid, hi), (lo, mid))
            self.levels.append((rank ^ 1 << k, kept, given, left))
            lo, hi = kept
        self.received = torch.empty(numel - numel // 2, device=device)  # the largest half a partner sends
        # the reduce-scatter sends the given halves, the all-gather the kept ones
        self.sent_values = sum(g[1] - g[0] + k[1] - k[0] for _, k, g, _ in self.levels)

    def __call__(self, row: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """total = the tree's sum of every rank's `row` (this rank's: its subtree's sum)."""
        total.copy_(row)
        for partner, (lo, hi), (g_lo, g_hi), left in self.levels:  # reduce-scatter
            mine, theirs = total[lo:hi], self.received[:hi - lo]
            swap(total[g_lo:g_hi], theirs, partner)
            torch.add(mine, theirs, out=mine) if left else torch.add(theirs, mine, out=mine)
        for partner, (lo, hi), (g_lo, g_hi), _ in reversed(self.levels):  # all-gather: bytes only
            swap(total[lo:hi], total[g_lo:g_hi], partner)
        return total


def swap(send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
    """Send `send` to rank `peer` while receiving its values into `recv`."""
    ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def through_shared_memory(shared: HostAllReduce) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The same sum through the shared block: every rank's row gathered, the top levels added here."""
    def exchange(row: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        level = shared.gather(row)
        while len(level) > 2:  # the tree's top levels, over the ranks' subtrees
            level = level[0::2] + level[1::2]
        return torch.add(level[0], level[1], out=total)
    return exchange


def exchanger(cpu_allreduce: str, rank: int, world_size: int, numel: int, device: torch.device):
    """(exchange(row, total) or None for one process, how it travels in words, the bytes this rank sends per
    step, the shared-memory block or None)."""
    if world_size == 1:
        return None, "all summed here", 0, None
    shared = host_allreduce.wanted(cpu_allreduce, rank, world_size, numel, device)
    if shared:
        return through_shared_memory(shared), "partial sums added through shared memory", 0, shared
    tree = HalvingDoubling(rank, world_size, numel, device)
    sent = tree.sent_values * 4
    how = (f"partial sums reduce-scattered and all-gathered in the tree's order by {dist.get_backend()} send/recv "
           f"({sent / 1e6:.2f} MB sent per rank per step)")
    return tree, how, sent, None
