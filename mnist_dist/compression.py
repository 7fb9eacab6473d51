"""--grad-compression: fewer bytes per step for slow links, by torch's DDP communication hooks.

- fp16, bf16: each bucket is cast to 16 bits, all-reduced and cast back (`fp16_compress_hook`,
  `bf16_compress_hook`): half the bytes. bf16 keeps float32's range, fp16 three more bits of precision.
- powersgd: PowerSGD (Vogels et al., NeurIPS 2019; torch's `powerSGD_hook`). Each weight matrix M (n x m,
  a conv's kernel flattened) travels as the factors of a rank-r approximation: P = M Q is all-reduced
  and orthogonalised, then Q = M^T P; biases go as they are. Error feedback adds what the approximation
  left out to the next step's gradient (nothing is lost, only delayed); warm start begins each step's
  power iteration from the last Q, so one iteration a step tracks the gradient's top subspace. Plain
  all_reduce until step --powersgd-start: the first steps move fastest and are the most sensitive.
  The MLP at rank 2: (128 + 784) * 2 + (10 + 128) * 2 values for its two matrices and 138 for its biases,
  9 kB a step instead of 407 kB (45x); the CNN 32 kB instead of 1.69 MB (53x).

PowerSGD's state lives per rank (each rank's error differs; Q and the iteration agree). Checkpoints carry
every rank's, as tensors keyed by parameter name (DDP regroups its buckets after the first step, so a
state laid out by bucket would not fit the resumed run's first step): a resume at the same world size
continues bit for bit; at another one the state starts afresh, said in one line.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from .checkpoint import numpy_rng, numpy_rng_tuple
from .config import Config
from .errors import CheckpointError, UsageError, first_line, warn

class Compression:
    """No compression: torch's plain all_reduce (DDP's own, no hook)."""

    hook = None
    stateful = False
    compresses_from = 0  # the first step that sends payload_bytes (before it: the whole gradient)

    def __init__(self, params: list[torch.Tensor]):
        self.full_bytes = sum(p.numel() * p.element_size() for p in params)

    @property
    def payload_bytes(self) -> int:
        """What each rank hands in to the all_reduce per step."""
        return self.full_bytes

    def describe(self) -> str:
        return f"no compression ({mb(self.full_bytes)} a step)"


class Cast(Compression):
    """fp16 or bf16: every gradient cast to 16 bits for the all_reduce."""

    def __init__(self, params: list[torch.Tensor], kind: str, device: torch.device, probe: bool):
        super().__init__(params)
        self.kind = kind
        self.hook = default_hooks.fp16_compress_hook if kind == "fp16" else default_hooks.bf16_compress_hook
        if kind == "bf16" and probe:
            check_bf16(device)

    @property
    def payload_bytes(self) -> int:
        return self.full_bytes // 2

    def describe(self) -> str:
        return f"{self.kind} compression ({mb(self.payload_bytes)} a step instead of {mb(self.full_bytes)})"


def check_bf16(device: torch.device) -> None:
    """Refuse bf16 where the process group cannot all_reduce it (gloo in some torch releases): tried once,
    on every rank, before training (the refusal is a local check, the same on every rank)."""
    try:
        dist.all_reduce(torch.zeros(1, dtype=torch.bfloat16, device=device))
    except (RuntimeError, ValueError, TypeError) as err:
        raise UsageError(f"--grad-compression bf16: {dist.get_backend()} in torch {torch.__version__} cannot "
                         f"all_reduce bfloat16 ({first_line(err, 120)}); use --grad-compression fp16",
                         everywhere=True) from None


class PowerSGD(Compression):
    """torch's powerSGD_hook and its state, which the checkpoints carry per parameter."""

    stateful = True

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.names, self.params = zip(*model.named_parameters(), strict=True)
        super().__init__(list(self.params))
        self.state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
                                        start_powerSGD_iter=cfg.powersgd_start, random_seed=cfg.seed)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.layouts: dict[int, tuple[int, ...]] = {}  # bucket index -> its parameters, as the state is laid out
        self.loose: dict[int, dict[str, torch.Tensor]] = {}  # parameter -> {"error", "q"}: not in a bucket yet

    @property
    def compresses_from(self) -> int:
        return self.state.start_powerSGD_iter

    def hook(self, _state, bucket):  # no annotations: DDP checks them against its own classes
        """torch's hook, after laying the state out for this bucket where DDP regrouped its parameters."""
        b, layout = bucket.index(), tuple(self.index[id(p)] for p in bucket.parameters())
        if self.layouts.get(b) != layout:
            for other, params in list(self.layouts.items()):
                if other == b or set(params) & set(layout):
                    self.unpack(other)
            self.layouts[b] = layout
            self.pack(b)
        return psgd.powerSGD_hook(self.state, bucket)

    # --- the state, per bucket (torch's) or per parameter (the checkpoint's) -------------------------
    def q_slots(self, layout: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """(parameter, length of its P, length of its Q) of each compressed matrix, in the order of the
        hook's P and Q memory: grouped by shape, in bucket order within a shape."""
        groups: dict[tuple[int, int], list] = {}
        for i in layout:
            n = self.params[i].shape[0]
            m = self.params[i].numel() // n
            r = min(n, m, self.state.matrix_approximation_rank)
            if psgd._should_compress(n, m, r, self.state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((i, n * r, m * r))
        return [slot for group in groups.values() for slot in group]

    def unpack(self, b: int) -> None:
        """Bucket b's state into per-parameter pieces."""
        layout, s = self.layouts.pop(b), self.state
        if b in s.error_dict:
            pieces = s.error_dict.pop(b).split([self.params[i].numel() for i in layout])
            for i, piece in zip(layout, pieces, strict=True):
                self.loose.setdefault(i, {})["error"] = piece.view_as(self.params[i])
        if b in s.q_memory_dict:
            s.p_memory_dict.pop(b, None)  # P is computed from Q before it is read
            slots = self.q_slots(layout)
            for (i, *_), piece in zip(slots, s.q_memory_dict.pop(b).split([q for *_, q in slots]), strict=True):
                self.loose.setdefault(i, {})["q"] = piece

    def pack(self, b: int) -> None:
        """Per-parameter pieces into bucket b's state (where every piece it needs is there)."""
        layout, s = self.layouts[b], self.state
        device = self.params[layout[0]].device
        if all("error" in self.loose.get(i, {}) for i in layout):
            s.error_dict[b] = torch.cat([self.loose[i].pop("error").reshape(-1) for i in layout]).to(device)
        slots = self.q_slots(layout)
        if slots and all("q" in self.loose.get(i, {}) for i, *_ in slots):
            s.q_memory_dict[b] = torch.cat([self.loose[i].pop("q") for i, *_ in slots]).to(device)
            s.p_memory_dict[b] = torch.empty(sum(p for _, p, _ in slots), device=device)  # written before read
        self.loose = {i: v for i, v in self.loose.items() if v}

    def rank_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's error feedback and Q per parameter name (CPU copies)."""
        layouts = dict(self.layouts)
        for b in layouts:
            self.unpack(b)
        saved = {self.names[i]: {k: t.detach().cpu().clone() for k, t in v.items()} for i, v in self.loose.items()}
        self.layouts.update(layouts)
        for b in layouts:
            self.pack(b)
        return saved

    # --- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self, world_size: int, device: torch.device) -> dict:
        """Every rank's state, on every rank (each calls this: one all_gather); rank 0 saves it."""
        mine = self.rank_state()
        keys = [(name, k) for name in sorted(mine) for k in sorted(mine[name])]
        flat = torch.cat([mine[n][k].reshape(-1) for n, k in keys] or [torch.zeros(0)]).to(device)
        rows = [flat]
        if world_size > 1 and flat.numel():  # nothing before the first compressed step (the same on every rank)
            rows = [torch.empty_like(flat) for _ in range(world_size)]
            dist.all_gather(rows, flat)
        rows += [flat] * (world_size - len(rows))
        ranks = []
        for row in rows:
            pieces = iter(row.cpu().split([mine[n][k].numel() for n, k in keys]))
            state: dict[str, dict[str, torch.Tensor]] = {}
            for n, k in keys:
                state.setdefault(n, {})[k] = next(pieces).view_as(mine[n][k]).clone()
            ranks.append(state)
        return {"kind": "powersgd", "world_size": world_size, "iter": self.state.iter, "ranks": ranks,
                "rng": numpy_rng(self.state.rng.get_state())}

    def restore(self, saved: dict | None, world_size: int, rank: int, step: int) -> None:
        """The state a checkpoint carries, for this rank; afresh (said once, by rank 0) when it was saved
        by another number of ranks. The iteration follows the training step either way."""
        self.state.iter = step
        if saved is None:
            return
        try:
            self.state.rng.set_state(numpy_rng_tuple(saved["rng"]))
            if saved["world_size"] != world_size:
                if rank == 0:
                    warn(f"the checkpoint's PowerSGD state is from {saved['world_size']} ranks, now {world_size}: "
                         f"its error feedback and warm start begin afresh")
                return
            self.state.iter = int(saved["iter"])
            mine = saved["ranks"][rank]
            self.loose = {i: self.checked(mine[name], i) for i, name in enumerate(self.names) if name in mine}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"the checkpoint's PowerSGD state is unusable ({first_line(err, 120)}): resume "
                                  f"from another checkpoint (--resume PATH)") from None

    def checked(self, saved: dict, i: int) -> dict[str, torch.Tensor]:
        """One parameter's saved state, its shapes checked against the parameter's."""
        p, wanted = self.params[i], {"error": self.params[i].numel()}
        wanted.update(("q", q_len) for _, _, q_len in self.q_slots((i,)))  # a compressed matrix's Q
        if set(saved) != set(wanted) or any(not isinstance(t, torch.Tensor) or t.dtype != p.dtype
                                            or t.numel() != wanted[k] for k, t in saved.items()):
            raise ValueError(f"{self.names[i]}'s error or Q is missing or has the wrong shape or type")
        return {k: t.reshape(-1) for k, t in saved.items()}

    # --- what it costs ------------------------------------------------------------------------------
    @property
    def payload_bytes(self) -> int:
        """Per step once compressing: every compressed matrix's P and Q, the rest as it is."""
        slots = self.q_slots(tuple(range(len(self.params))))
        compressed = {i for i, *_ in slots}
        rest = sum(p.numel() for i, p in enumerate(self.params) if i not in compressed)
        return (rest + sum(p + q for _, p, q in slots)) * self.params[0].element_size()

    def describe(self) -> str:
        ratio = self.full_bytes / max(self.payload_bytes, 1)
        return (f"PowerSGD rank {self.state.matrix_approximation_rank} from step {self.compresses_from} "
                f"({mb(self.payload_bytes)} a step instead of {mb(self.full_bytes)}, {ratio:.0f}x less)")


def make(cfg: Config, model: torch.nn.Module, device: torch.device, world_size: int) -> Compression:
    """The compression --grad-compression names. Every rank calls it (bf16 is tried with a collective,
    where there are several ranks)."""
    if cfg.grad_compression == "powersgd":
        return PowerSGD(model, cfg)
    if cfg.grad_compression in ("fp16", "bf16"):
        return Cast(list(model.parameters()), cfg.grad_compression, device, probe=world_size > 1)
    return Compression(list(model.parameters()))


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3g} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.3g} kB"
