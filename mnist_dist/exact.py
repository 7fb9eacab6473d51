"""--exact: the same model, bit for bit, from any number of ranks that divides the global batch's pieces.

Floating-point addition is not associative, so a sum's bits depend on its order, and a data-parallel
job's order depends on its world size: how many samples each rank's kernels reduce over, and how the
collective adds the ranks' sums (gloo's and NCCL's orders change with the algorithm, the message size
and the topology). Here every order is fixed by the global batch alone:

- the global batch of B samples is cut into P pieces of B/P (--pieces, a power of two); rank r of W
  holds the contiguous pieces r*P/W ... (r+1)*P/W - 1 (`data.exact_epoch_indices`);
- each piece's gradient is computed by itself, by the same kernels on the same shapes whatever W is,
  on one intra-op thread (`one_thread`: a matrix product's or a reduction's bits may depend on how many
  threads share it; an elementwise kernel's never do, so the additions and Adam keep the process's);
- the pieces' gradients are summed along one binary tree over the P pieces. A rank's pieces are a
  whole subtree, so it sums them itself; the tree's top levels, over the ranks' subtrees, are added by
  `exact_exchange` in the same order (a reduce-scatter and all-gather that pair sibling subtrees, or
  shared memory on one host: never an addition inside a collective, whose order gloo and NCCL choose).
  Every rank, and one process doing the whole tree, thus performs the same additions on the same bits;
- what else depends on how the batch is split is keyed to the global batch: batch norm normalises each
  piece by the piece's own statistics (the running statistics move once a step, by the tree's mean of
  the pieces' statistics), and dropout's masks are a hash of (seed, step, position in the global
  batch) instead of draws from each rank's generator.

The MLP's piece gradient is written out (autograd's bookkeeping costs more than a piece's arithmetic);
other models go through autograd, one piece at a time.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .config import Config
from .ddp import Exchange
from .distributed import DistEnv
from .exact_exchange import exchanger


class ExactStep:
    """One training step of --exact: the global batch's mean loss, and its gradient set as the
    parameters' .grad, with the same bits on every rank and for every world size that divides P.

    A row holds one (sub)tree's sum: every gradient, the loss, each norm's mean and variance, each term
    scaled so that the sum over the pieces is the batch's mean (the norms': the pieces' mean)."""

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv, device: torch.device):
        self.model, self.params, self.seed = model, list(model.parameters()), cfg.seed
        self.piece = cfg.batch_size // cfg.pieces           # samples per piece
        self.local = cfg.pieces // env.world_size           # pieces per rank: a whole subtree
        self.first = env.rank * self.local                  # this rank's first piece
        self.per_sample, self.per_piece = 1 / cfg.batch_size, 1 / cfg.pieces
        self.depth = self.local.bit_length() - 1            # of this rank's subtree
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.sizes = [p.numel() for p in self.params] + [1] + [n.num_features for n in self.norms for _ in "mv"]
        self.root = torch.zeros(sum(self.sizes), device=device)  # this rank's subtree's sum
        self.exchange, how, sent, self.shared = exchanger(cfg.cpu_allreduce, env.rank, env.world_size,
                                                          len(self.root), device)
        self.exchange_info = Exchange(f"--exact: {cfg.pieces} pieces of {self.piece} samples a step; {how}",
                                      self.root.numel() * 4, sent, shared_memory=self.shared is not None)
        self.total = torch.empty_like(self.root) if self.exchange else self.root  # the whole tree's
        self.result = self.unpack(self.total)
        self.terms = MLPTerms(self, device) if cfg.model == "mlp" else AutogradTerms(self, device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: this rank's pieces of global step `step` (0-based), in order. Returns the global batch's
        mean loss (a 0-dim tensor) and this rank's logits; sets every parameter's .grad."""
        with one_thread():
            logits = self.terms.sum(x, y, step)
        if self.exchange:
            progress.entering("the exchange of --exact's partial sums")
            self.exchange(self.root, self.total)
        gradients, loss, stats = self.result
        for p, g in zip(self.params, gradients, strict=True):
            p.grad = g
        self.move_norms(stats)
        return loss[0].clone(), torch.cat(logits)

    @torch.no_grad()
    def move_norms(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The running statistics, once per step, by the pieces' mean statistics (as batch norm would move
        them by one batch's)."""
        for norm, (mean, var) in zip(self.norms, stats, strict=True):
            m = norm.momentum
            norm.running_mean.mul_(1 - m).add_(mean, alpha=m)
            norm.running_var.mul_(1 - m).add_(var, alpha=m)
            norm.num_batches_tracked += 1

    def unpack(
        self, row: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A row's gradients (shaped as the parameters), loss and (mean, variance) of each norm."""
        parts = list(row.split(self.sizes))
        grads = [part.view_as(p) for part, p in zip(parts[:len(self.params)], self.params, strict=True)]
        stats = parts[len(self.params) + 1:]
        return grads, parts[len(self.params)], list(zip(stats[0::2], stats[1::2], strict=True))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The block on one intra-op thread (setting the count costs well under a microsecond): what --exact
    computes there has the same bits in a process of any thread count (torchrun's ranks have 1, a plain
    python process one per core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tree_sum(term: Callable[[int, int], None], n: int, levels: list[torch.Tensor]) -> None:
    """levels[0] = term 0 + ... + term n-1 (n a power of two) along the binary tree: ((t0 + t1) + (t2 + t3)) + ...
    `term(q, i)` writes term q into levels[i]. Depth first, so levels[i] holds a pending left-hand sum
    and 1 + log2(n) buffers serve any n."""
    def visit(first: int, n: int, i: int) -> None:
        if n == 1:
            term(first, i)
            return
        visit(first, n // 2, i)
        visit(first + n // 2, n // 2, i + 1)
        levels[i].add_(levels[i + 1])
    visit(0, n, 0)


def buffers_like(out: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """[out] and `depth` scratch buffers of its shape: what tree_sum needs for 2**depth terms."""
    return [out, *torch.zeros(depth, *out.shape, device=out.device)]


class AutogradTerms:
    """Any model's terms, by autograd, one piece at a time: each term a whole row."""

    def __init__(self, step: ExactStep, device: torch.device):
        self.step, self.model = step, step.model
        self.levels = buffers_like(step.root, step.depth)
        self.views = [step.unpack(row) for row in self.levels]
        for i, norm in enumerate(step.norms):
            norm.track_running_stats = False  # normalise by the piece's statistics; `move_norms` moves the running ones
            norm.register_forward_pre_hook(self.recorder(i))
        self.dropouts = keyed_dropouts(self.model)
        self.recording: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sum(self, x: torch.Tensor, y: torch.Tensor, step: int) -> list[torch.Tensor]:
        """This rank's pieces' sum into the step's root; returns the pieces' logits."""
        s, logits, pieces = self.step, [], list(zip(x.split(self.step.piece), y.split(self.step.piece), strict=True))

        def term(q: int, i: int) -> None:
            x, y = pieces[q]
            grads, loss, self.recording = self.views[i]  # the norms' hooks write the piece's statistics there
            for dropout in self.dropouts:
                dropout.key = (s.seed, step, (s.first + q) * s.piece)
            z = self.model(x)
            piece_loss = F.cross_entropy(z, y, reduction="sum") * s.per_sample
            with torch.no_grad():
                for view, g in zip(grads, torch.autograd.grad(piece_loss, s.params), strict=True):
                    view.copy_(g)
                loss.copy_(piece_loss)
            logits.append(z.detach())
        tree_sum(term, len(pieces), self.levels)
        return logits

    def recorder(self, i: int) -> Callable:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if not module.training:
                return
            x = inputs[0].detach()
            var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=1)
            self.recording[i][0].copy_(mean).mul_(self.step.per_piece)
            self.recording[i][1].copy_(var).mul_(self.step.per_piece)
        return record


class MLPTerms:
    """The MLP's terms, written out: autograd's arithmetic without its bookkeeping (which costs more than
    a piece's arithmetic). The first layer's weight gradient, 100k of the 102k numbers, is summed in
    blocks of rows that stay in the CPU's cache; a tree over whole rows would move each level through
    memory. Same shapes for every world size, so the same bits."""

    BLOCK = 64  # rows of the first layer's weight gradient summed at once

    def __init__(self, step: ExactStep, device: torch.device):
        self.step = step
        w1, b1, w2, b2 = step.params
        self.w1t, self.w2t = w1.t(), w2.t()  # views: they follow the optimizer's in-place updates
        root_w1, root_rest = step.root[:w1.numel()].view_as(w1), step.root[w1.numel():]  # rest: b1, w2, b2, loss
        self.rest = buffers_like(root_rest, step.depth)
        self.rest_views = [(gb1, g2.view_as(w2), gb2, loss.view(())) for gb1, g2, gb2, loss in
                           (row.split([b1.numel(), w2.numel(), b2.numel(), 1]) for row in self.rest)]
        self.targets = torch.eye(w2.shape[0], device=device) * -step.per_sample  # a row per label: -one-hot / B
        scratch = buffers_like(root_w1[:self.BLOCK], step.depth)[1:]  # shared by the blocks
        self.blocks = [[block, *scratch] for block in root_w1.split(self.BLOCK)]

    @torch.no_grad()
    def sum(self, x: torch.Tensor, y: torch.Tensor, _step: int) -> list[torch.Tensor]:
        """This rank's pieces' sum into the step's root; returns the pieces' logits."""
        s, w2 = self.step, self.w2t.t()
        (_, b1, _, b2), acts = s.params, []
        for xp, target in zip(x.flatten(1).split(s.piece), self.targets.index_select(0, y).split(s.piece), strict=True):
            h = torch.addmm(b1, xp, self.w1t).relu_()
            z = torch.addmm(b2, h, self.w2t)
            logp = z.log_softmax(1)
            dz = logp.exp().mul_(s.per_sample).add_(target)        # d(loss)/d(logits): (softmax - one-hot) / B
            dh = torch.ops.aten.threshold_backward(dz @ w2, h, 0)  # through the ReLU
            acts.append((xp, h, z, logp.mul_(target), dz, dh, dh.t().split(self.BLOCK)))

        def rest(q: int, i: int) -> None:
            _, h, _, losses, dz, dh, _ = acts[q]  # losses: -log p(label) / B at each label
            gb1, g2, gb2, loss = self.rest_views[i]
            torch.sum(dh, 0, out=gb1)
            torch.mm(dz.t(), h, out=g2)
            torch.sum(dz, 0, out=gb2)
            torch.sum(losses, (0, 1), out=loss)
        tree_sum(rest, len(acts), self.rest)
        for b, levels in enumerate(self.blocks):
            def w1_block(q: int, i: int, b: int = b, levels: list = levels) -> None:
                torch.mm(acts[q][-1][b], acts[q][0], out=levels[i])
            tree_sum(w1_block, len(acts), levels)
        return [a[2] for a in acts]


class KeyedDropout(nn.Module):
    """Dropout whose mask for a sample is a hash of (seed, step, the sample's position in the global
    batch): the same mask whichever rank holds the sample. `key` is (seed, step, the first sample's
    position), set by ExactStep before each piece."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.key = p, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seed, step, first = self.key
        positions = torch.arange(first, first + len(x), device=x.device)
        keep = keyed_uniform(seed, step, positions, x[0].numel()) >= self.p
        return x * keep.view_as(x) / (1 - self.p)


def keyed_dropouts(model: nn.Module) -> list[KeyedDropout]:
    """Swap the model's nn.Dropout layers for KeyedDropout ones (same p: the state dict is unchanged)."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                swapped.append(KeyedDropout(child.p))
                setattr(parent, name, swapped[-1])
    return swapped


M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (a bijection with good avalanche), of a Python int or an int64 tensor
    holding values below 2**32; products stay below 2**63, so nothing overflows on any device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def keyed_uniform(seed: int, step: int, positions: torch.Tensor, n: int) -> torch.Tensor:
    """[len(positions), n] numbers in [0, 1), each a function of (seed, step, position, index) alone."""
    key = mix32(mix32(seed & M32) ^ (step & M32))
    per_sample = mix32((positions ^ key) & M32)
    index = torch.arange(n, device=positions.device)
    bits = mix32((per_sample[:, None] ^ mix32(index)[None, :]) & M32)
    return (bits >> 8).float() * 2.0 ** -24
