"""One rank's view of `distributed.choose_interface` (tests/test_hosts.py): RANK HOST:PORT [VAR=VALUE ...]
joins a 2-rank store at HOST:PORT with those variables preset, and prints what the job would set
(GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME) as JSON."""
import datetime
import json
import sys
from types import SimpleNamespace

import torch.distributed as dist

from mnist_dist.distributed import SOCKET_IFNAMES, choose_interface

rank, (host, port) = int(sys.argv[1]), sys.argv[2].split(":")
environ = dict(arg.split("=", 1) for arg in sys.argv[3:])
store = dist.TCPStore(host, int(port), 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=30))
choose_interface(store, SimpleNamespace(rank=rank, world_size=2), environ)
print(json.dumps({name: environ.get(name) for name in SOCKET_IFNAMES}))
store.set(f"done/{rank}", "1")
store.wait([f"done/{1 - rank}"])  # rank 0 serves the store until rank 1 has read it
