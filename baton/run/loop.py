"""Train one epoch and validate, on a prepared strategy, in plain torch.

Models with mmengine's ``train_step(data, optim_wrapper)`` / ``val_step(data)`` are
driven as they are; a plain ``nn.Module`` is driven with ``(inputs, targets)`` batches
and a loss function. Iteration-based schedulers step every iteration, epoch-based ones
at the end of the epoch, as mmengine's scheduler hook does. The strategy's position
(``epoch``, ``iter``, ``step_in_epoch``) advances as training does, so a checkpoint
taken at any iteration resumes exactly there.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from baton.data.loader import ResumableLoader

IterationHook = Callable[["RunningMetrics"], None]


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch  # a dispatch saved per tensor per iteration
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class EpochMeter:
    """Sample-weighted running means of a batch's loss and accuracy.

    On an accelerator the sums stay on the device as tensors (float64 for the loss where
    the device has it), so training never waits for the device to report a number; they
    are read only when :meth:`result` is called. On the CPU, where reading a number costs
    no wait, they are Python numbers: fewer tensor operations per iteration.
    """

    def __init__(self, reduce: Callable[[list[float]], list[float]] | None = None) -> None:
        # With several processes: sums the four totals across them, so that every process
        # reports the metrics of the whole batch (a collective: every process reads the
        # meter at the same iterations).
        self.reduce = reduce
        self.samples = 0
        self.loss_sum: torch.Tensor | float = 0.0
        self.correct: torch.Tensor | int = 0
        self.classified = 0
        self._result: dict[str, float] | None = None

    def update(self, loss, count: int, outputs=None, targets=None) -> None:
        on_host = not isinstance(loss, torch.Tensor) or loss.is_cpu
        if on_host:
            loss = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
        else:  # MPS has no float64
            loss = loss.detach().to(torch.float32 if loss.device.type == "mps" else torch.float64)
        self.loss_sum = self.loss_sum + loss * count
        self.samples += count
        if (
            outputs is not None
            and isinstance(targets, torch.Tensor)
            and targets.dtype == torch.long
            and outputs.dim() == 2
        ):
            hits = (outputs.argmax(1) == targets).sum()  # an index: no graph, no detach
            self.correct = self.correct + (int(hits) if hits.is_cpu else hits)
            self.classified += targets.numel()
        self._result = None

    def state_dict(self) -> dict:
        """The running sums as plain numbers, for a checkpoint taken inside an epoch.

        A resume inside an epoch loads them, so the epoch's metrics cover every
        iteration of the epoch, not only those after the resume. Reading them waits
        for the device once (a checkpoint waits for it anyway).
        """
        samples, loss_sum, correct, classified = self._totals()
        return {
            "samples": int(samples),
            "loss_sum": float(loss_sum),
            "correct": int(correct),
            "classified": int(classified),
        }

    def _totals(self) -> list[float]:
        totals = [self.samples, float(self.loss_sum), int(self.correct), self.classified]
        return totals if self.reduce is None else self.reduce(totals)

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from sums saved by :meth:`state_dict` (with several processes, only
        one of them loads the totals: the others' sums start at zero)."""
        self.samples = int(state["samples"])
        self.loss_sum = float(state["loss_sum"])
        self.correct = int(state["correct"])
        self.classified = int(state["classified"])
        self._result = None

    def result(self) -> dict[str, float]:
        if self._result is None:
            samples, loss_sum, correct, classified = self._totals()
            metrics = {"loss": float(loss_sum) / max(samples, 1)}
            if classified:
                metrics["accuracy"] = int(correct) / classified
            self._result = metrics
        return dict(self._result)


class RunningMetrics(Mapping):
    """The running means of the epoch so far, as a read-only mapping handed to iteration
    hooks. Values are computed when read (reading waits for the device), so a hook that
    looks at them only every N iterations costs nothing in between."""

    def __init__(self, meter: EpochMeter) -> None:
        self._meter = meter

    def __getitem__(self, key: str) -> float:
        return self._meter.result()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._meter.result())

    def __len__(self) -> int:
        return len(self._meter.result())


def train_epoch(
    strategy,
    loader: ResumableLoader,
    *,
    loss_fn: nn.Module | Callable | None = None,
    max_iters: int | None = None,
    on_iteration: IterationHook | None = None,
    meter: EpochMeter | None = None,
) -> dict[str, float]:
    """Train the rest of the current epoch (``strategy.epoch``) from ``strategy.step_in_epoch``.

    Args:
        strategy: A prepared :class:`~baton.SingleDeviceStrategy` with an optim wrapper.
        loader: The training batches.
        loss_fn: Loss of ``(outputs, targets)``; unused for models with ``train_step``.
        max_iters: Stop when the strategy reaches this many iterations.
        on_iteration: Called after every iteration with the running metrics (for
            iteration checkpoints and progress).
        meter: The epoch's running sums so far, to continue an epoch that an earlier
            call (or a resumed checkpoint) began; updated in place. ``None``: a fresh one.

    Returns:
        ``{'loss': mean loss, 'accuracy': ...}`` over the iterations ``meter`` has seen
        (without ``meter``: the iterations this call ran).
    """
    model, wrapper = strategy.model, strategy.optim_wrapper
    shared = loader.world_size > 1
    schedulers = getattr(strategy, "param_schedulers", [])
    per_iter = [s for s in schedulers if not s.by_epoch]
    per_epoch = [s for s in schedulers if s.by_epoch]
    uses_train_step = hasattr(model, "train_step")
    if loss_fn is None and not uses_train_step:
        raise ValueError("a model without train_step needs a loss_fn")
    meter = new_meter(strategy) if meter is None else meter
    running = RunningMetrics(meter)
    device = strategy.device  # asked once: it asks CUDA whether it is there
    model.train()
    for batch in loader.iter_epoch(strategy.epoch, start=strategy.step_in_epoch):
        if max_iters is not None and strategy.iter >= max_iters:
            break
        batch = _to_device(batch, device)
        if shared:
            wrapper.batch_share = loader.loss_share(strategy.step_in_epoch)
        if uses_train_step:
            log_vars = model.train_step(batch, wrapper)
            meter.update(log_vars["loss"], _batch_size(batch))
        else:
            inputs, targets = batch
            with wrapper.optim_context(model):
                outputs = model(inputs)
                loss = loss_fn(outputs, targets)
            wrapper.update_params(loss)
            meter.update(loss, len(targets), outputs, targets)
        for scheduler in per_iter:
            scheduler.step()
        strategy.iter += 1
        strategy.step_in_epoch += 1
        if on_iteration is not None:
            on_iteration(running)
    if strategy.step_in_epoch >= len(loader):
        for scheduler in per_epoch:
            scheduler.step()
        strategy.epoch += 1
        strategy.step_in_epoch = 0
    return meter.result()


@torch.no_grad()
def evaluate(
    strategy,
    loader: ResumableLoader,
    *,
    loss_fn: nn.Module | Callable | None = None,
) -> dict[str, float]:
    """Evaluate the model on every batch of ``loader``.

    Models with ``val_step(batch)`` return a dict of per-batch scalar metrics, averaged
    by batch size; plain modules are scored with ``loss_fn`` and, for class targets,
    accuracy. Validation draws no random numbers, so it never shifts a run's RNG.
    """
    model = strategy.model
    was_training = model.training
    model.eval()
    meter = EpochMeter()
    sums: dict[str, float] = {}
    reduce = _reducer(strategy)
    try:
        for batch in loader.iter_epoch(0):
            if _batch_size(batch) == 0:
                continue  # this process's share of a small last batch (several processes)
            batch = _to_device(batch, strategy.device)
            if hasattr(model, "val_step"):
                count = _batch_size(batch)
                for key, value in model.val_step(batch).items():
                    sums[key] = sums.get(key, 0.0) + float(value) * count
                meter.samples += count
            else:
                if loss_fn is None:
                    raise ValueError("a model without val_step needs a loss_fn")
                inputs, targets = batch
                outputs = model(inputs)
                meter.update(loss_fn(outputs, targets), len(targets), outputs, targets)
    finally:
        model.train(was_training)
    if sums:
        keys = sorted(sums)
        samples, *totals = [meter.samples, *(sums[k] for k in keys)]
        if reduce is not None:
            samples, *totals = reduce([samples, *totals])
        return {key: total / max(samples, 1) for key, total in zip(keys, totals, strict=True)}
    meter.reduce = reduce
    return meter.result()


def _reducer(strategy) -> Callable[[list[float]], list[float]] | None:
    """Sums across processes, for a strategy that trains on several (``None`` on one)."""
    return strategy.sum_across_ranks if strategy.world_size > 1 else None


def new_meter(strategy) -> EpochMeter:
    """An epoch's meter for ``strategy``: its metrics cover the whole batch, however many
    processes share it."""
    return EpochMeter(_reducer(strategy))


def forward_input(model: nn.Module, batch: Any) -> Any | None:
    """What the loops call ``model`` with for ``batch``: the inputs of an ``(inputs,
    targets)`` pair. ``None`` where the loops do not call the model so: a model with
    ``train_step`` gets the whole batch and the optimizer wrapper, and a batch of
    another shape is an error they report when they reach it."""
    if hasattr(model, "train_step") or not isinstance(batch, (list, tuple)) or len(batch) != 2:
        return None
    return batch[0]


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 1
