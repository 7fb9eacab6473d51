"""One rank of a check of --exact's exchange (tests/test_exact.py), under torchrun with gloo: every rank's row
is made from seeds alone (so each rank can make them all), with magnitudes from 1e-6 to 1e6, where the
order of additions shows in the bits. Prints JSON: whether the exchange's sum has the bits of the tree's
over all rows (as one process adds them), whether another order's sum differs, and the values sent."""
import json
import os

import torch
import torch.distributed as dist

from mnist_dist.exact_exchange import HalvingDoubling

N = 1001  # odd: the halves of each level differ by one


def row(r: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(r)
    return torch.randn(N, generator=g) * 10.0 ** torch.randint(-6, 7, (N,), generator=g)


dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
rows = [row(r) for r in range(world_size)]
level = torch.stack(rows)
while len(level) > 1:  # the tree's top levels, as ExactStep adds them in one process
    level = level[0::2] + level[1::2]
in_rank_order = rows[0].clone()
for r in rows[1:]:
    in_rank_order += r
exchange = HalvingDoubling(rank, world_size, N, torch.device("cpu"))
total = exchange(rows[rank], torch.empty(N))
line = json.dumps({"rank": rank, "tree_bits": torch.equal(total, level[0]),
                   "order_shows": not torch.equal(in_rank_order, level[0]), "sent": exchange.sent_values})
os.write(1, f"{line}\n".encode())  # one write (under PIPE_BUF): the 8 ranks' lines never interleave
dist.destroy_process_group()
