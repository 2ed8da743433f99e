"""The peers of benchmarks/peers.py: counting weights and bytes, plain fine-tuning, and the pruning methods
(Torch-Pruning's BasePruner, local or global ranking, and global magnitude pruning), each set up as peers.py's
docstring describes. peers.py imports this module (beside it, on sys.path when run as a script)."""

from __future__ import annotations

import copy
import io
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

# ---- counting -----------------------------------------------------------------------------------------------


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv2d layers of a model, in order (whose weights bayescomp's rates count)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _weight(m: nn.Module) -> torch.Tensor:
    return m.weight.detach()


def weights_dense(model: nn.Module) -> int:
    """Weights of the Linear/Conv2d layers (biases excluded, as in `bayescomp.compress.rates`)."""
    return sum(_weight(m).numel() for _, m in weight_layers(model))


def weights_nonzero(model: nn.Module) -> int:
    """Nonzero weights of the Linear/Conv2d layers (the masked values while a prune mask is attached)."""
    return sum(int((_weight(m) != 0).sum()) for _, m in weight_layers(model))


def architecture(model: nn.Module) -> str:
    """bayescomp's notation: kept inputs of each Linear, kept output channels of each Conv2d, here those with at
    least one nonzero weight (for a dense pruned model: all of them, i.e. its widths)."""
    arch = []
    for _, m in weight_layers(model):
        w = _weight(m)
        if isinstance(m, nn.Linear):
            arch.append(int((w != 0).any(dim=0).sum()))
        else:
            arch.append(int((w.flatten(1) != 0).any(dim=1).sum()))
    return "-".join(str(a) for a in arch)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def sparse_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save` of the CSR encoding described in the module docstring."""
    enc: dict[str, torch.Tensor] = {}
    for name, m in weight_layers(model):
        w = _weight(m).flatten(1)
        nz = w != 0
        cols = nz.nonzero()[:, 1]
        enc[f"{name}.crow"] = torch.cat([torch.zeros(1, dtype=torch.int64), nz.sum(1).cumsum(0)]).to(torch.int32)
        enc[f"{name}.col"] = cols.to(torch.int16 if w.shape[1] <= 32767 else torch.int32)
        enc[f"{name}.values"] = w[nz].to(torch.float32)
        if m.bias is not None:
            enc[f"{name}.bias"] = m.bias.detach().to(torch.float32)
    buf = io.BytesIO()
    torch.save(enc, buf)
    return buf.tell()


# ---- training -----------------------------------------------------------------------------------------------


class Batches:
    """Shuffled minibatch indices, epoch after epoch, from a seeded generator; counts the steps taken."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.per_epoch = math.ceil(n / batch_size)
        self.steps = 0
        self.last_at: float | None = None  # perf_counter when the last minibatch was handed out (a step began)
        self._order = torch.empty(0, dtype=torch.long)

    def next(self, now: float | None = None) -> torch.Tensor:
        """The next minibatch's indices; `now`: the perf_counter reading at which the caller decided to take the step
        (recorded as `last_at`, so a step begun before a deadline is never recorded after it)."""
        i = self.steps % self.per_epoch
        if i == 0:
            self._order = torch.randperm(self.n, generator=self.gen)
        self.steps += 1
        self.last_at = time.perf_counter() if now is None else now
        return self._order[i * self.batch_size : (i + 1) * self.batch_size]


def finetune(model: nn.Module, train, batches: Batches, lr: float, steps: int | None = None,
             deadline: float | None = None) -> None:
    """Adam on the cross-entropy for `steps` minibatches, or until `deadline` (perf_counter), checked before each."""
    x, y = train
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    done = 0
    while steps is None or done < steps:
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            break
        idx = batches.next(now)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1


# ---- the peers ------------------------------------------------------------------------------------------------


#: the input Torch-Pruning traces its dependency graph with (both models read 1×28×28 MNIST images)
EXAMPLE = torch.zeros(1, 1, 28, 28)


def tp_pruner(model: nn.Module, example: torch.Tensor, ratio: float, steps: int, global_pruning: bool):
    """Torch-Pruning's BasePruner as its README sets it up (see the module docstring)."""
    import torch_pruning as tp

    last = weight_layers(model)[-1][1]  # the final classifier: never pruned
    return tp.pruner.BasePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                pruning_ratio=ratio, iterative_steps=steps, ignored_layers=[last],
                                global_pruning=global_pruning)


def tp_kept_at(plain: nn.Module, example: torch.Tensor, ratio: float, steps: int, global_pruning: bool,
               total: int) -> float:
    """Weights kept (%) after the S-step schedule at `ratio`, run on a copy without training."""
    model = copy.deepcopy(plain)
    pruner = tp_pruner(model, example, ratio, steps, global_pruning)
    for _ in range(steps):
        pruner.step()
    return 100.0 * weights_dense(model) / total


def tp_ratio_for(plain: nn.Module, example: torch.Tensor, target_pct: float, steps: int, global_pruning: bool,
                 total: int | None = None, iterations: int = 16) -> tuple[float, float]:
    """(channel ratio, weights kept % it gives): bisection for the kept % nearest the target (module docstring).

    `total`: the original model's weights, when `plain` is already pruned (default: its own)."""
    total = weights_dense(plain) if total is None else total
    now = 100.0 * weights_dense(plain) / total
    if now <= target_pct:
        return 0.0, now
    # kept % falls with the ratio, but not everywhere (Torch-Pruning stops pruning a layer down to one channel),
    # so a coarse scan first, then bisection inside the first interval where the kept % crosses the target
    grid = [i / 20 for i in range(20)] + [0.99]
    kept = [now] + [tp_kept_at(plain, example, r, steps, global_pruning, total) for r in grid[1:]]
    cross = next((i for i in range(len(grid) - 1) if kept[i] > target_pct >= kept[i + 1]), None)
    if cross is None:
        i = min(range(len(grid)), key=lambda j: abs(kept[j] - target_pct))
        return grid[i], kept[i]
    lo, hi, kept_lo, kept_hi = grid[cross], grid[cross + 1], kept[cross], kept[cross + 1]
    for _ in range(iterations):
        mid = (lo + hi) / 2
        k = tp_kept_at(plain, example, mid, steps, global_pruning, total)
        if k > target_pct:
            lo, kept_lo = mid, k
        else:
            hi, kept_hi = mid, k
    return (lo, kept_lo) if kept_lo - target_pct < target_pct - kept_hi else (hi, kept_hi)


def _phases(steps: int, total_steps: int) -> list[int]:
    """Minibatches after each of `steps` pruning steps: `total_steps` spread evenly."""
    cuts = [round(total_steps * k / steps) for k in range(steps + 1)]
    return [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def run_method(method: str, plain: nn.Module, train, *, target_pct: float, steps: int, lr: float, batch_size: int,
               seed: int, finetune_epochs: float | None, time_left: float | None, tp_ratio: float | None) -> dict:
    """Prune a copy of `plain` with `method` in `steps` steps, fine-tuning after each: `finetune_epochs` in all,
    or until `time_left` seconds from now have passed. Returns the model and what was done."""
    t0 = time.perf_counter()
    model = copy.deepcopy(plain)
    total = weights_dense(plain)
    batches = Batches(len(train[0]), batch_size, seed + 1000)
    budget = _phases(steps, round(finetune_epochs * batches.per_epoch)) if finetune_epochs is not None else None
    end = None if time_left is None else t0 + time_left
    if method.startswith("torch_pruning"):
        pruner = tp_pruner(model, EXAMPLE, tp_ratio, steps, method == "torch_pruning_global")
        params = None
    else:
        params = [(m, "weight") for _, m in weight_layers(model)]
        pruner = None
    def prune_step(k: int) -> None:
        if pruner is None:
            _magnitude_step(params, total, target_pct, (k + 1) / steps)
        elif k < steps - 1 or method == "torch_pruning":
            pruner.step()
        else:  # global ranking: the last step lands on the target from where the fine-tuned model is
            last, _ = tp_ratio_for(model, EXAMPLE, target_pct, 1, True, total=total)
            if last > 0.0:
                tp_pruner(model, EXAMPLE, last, 1, True).step()

    trained = 0  # pruning steps taken within the budget, each followed by its fine-tuning
    for k in range(steps):
        if end is not None and time.perf_counter() >= end:
            break  # no time left: the remaining steps are taken below, without fine-tuning
        prune_step(k)
        if budget is not None:
            finetune(model, train, batches, lr, steps=budget[k])
        else:
            finetune(model, train, batches, lr, deadline=t0 + time_left * (k + 1) / steps)
        trained += 1
    for k in range(trained, steps):
        prune_step(k)
    if params is not None:
        for m, name in params:
            prune.remove(m, name)
    seconds = time.perf_counter() - t0
    last = None if batches.last_at is None else batches.last_at - t0
    return {"model": model, "seconds": seconds, "finetune_epochs": batches.steps / batches.per_epoch,
            "finetune_steps": batches.steps, "prune_steps_trained": trained, "last_step_started": last}


def _magnitude_step(params, total: int, target_pct: float, fraction: float) -> None:
    """Global L1 magnitude pruning to `fraction` of the final share of weights removed."""
    zeros_target = round(total * (1 - target_pct / 100.0) * fraction)
    zeros_now = sum(int((m.weight_mask == 0).sum()) for m, _ in params if hasattr(m, "weight_mask"))
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=max(zeros_target - zeros_now, 0))
