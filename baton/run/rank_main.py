"""One rank of a run on several processes: started by torchrun, driven by commands.

``python -m torch.distributed.run ... -m baton.run.rank_main``, with the driver's address
and key in the environment (:mod:`baton.run.ranks` starts it so). The rank connects, says
its rank, and runs each command with the same step functions a single process runs
(:mod:`baton.run.steps`) on its own live pipeline, which holds a
:class:`~baton.engine.ddp.DDPStrategy`: every rank runs every command, and the
collectives inside (gradients, metrics, the agreed stop, the sharded save) keep them in
step.

A rank never outlives its driver: when the driver's connection closes (the driver ended or
was killed), the rank exits at once; when torchrun dies, the kernel kills the rank.
"""

import contextlib
import os
import signal
import threading
import time
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Client, Connection
from queue import Queue

import torch
import torch.distributed as dist

from baton.checkpoint.ref import CheckpointRef
from baton.config import validate
from baton.lifetime import die_with_parent
from baton.run import pipeline as pl
from baton.run import ranks, steps
from baton.run.interrupt import StopRequest, TrainingInterrupted
from baton.run.live import Pipeline
from baton.trust.allowances import Trust, held_trust

# Iterations between two checks of a termination request (each check is one small
# collective, so that every rank stops at the same iteration).
STOP_CHECK_EVERY = 8
# Seconds between two progress reports of rank 0.
PROGRESS_EVERY_S = 0.5


class AgreedStop(StopRequest):
    """A termination request every rank acts on at the same iteration: every
    ``STOP_CHECK_EVERY`` iterations, and at the epoch's last, the ranks learn whether any
    of them was asked to stop (one small collective)."""

    def __init__(self, asked: threading.Event, pipeline: Pipeline) -> None:
        super().__init__()
        self._asked = asked
        self._pipeline = pipeline

    def check(self, *_args) -> None:
        strategy = self._pipeline.strategy
        at_end = (
            strategy.step_in_epoch >= self._pipeline.epoch_length
            or strategy.iter >= self._pipeline.max_iters
        )
        if strategy.iter % STOP_CHECK_EVERY and not at_end:
            return
        flag = torch.tensor([1.0 if self._asked.is_set() else 0.0])
        if dist.get_backend() == "nccl":  # NCCL takes device tensors only
            flag = flag.to(strategy.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.signum = signal.SIGTERM
        super().check()


class AskedStop(StopRequest):
    """A termination request of the driver, acted on at the next iteration (a process that
    trains alone: nobody to agree with)."""

    def __init__(self, asked: threading.Event) -> None:
        super().__init__()
        self._asked = asked

    def check(self, *_args) -> None:
        if self._asked.is_set():
            self.signum = signal.SIGTERM
        super().check()


class Rank:
    """This process's part of the run: its connection to the driver and its pipeline."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._sending = threading.Lock()  # results, progress and log records share it
        self.commands: Queue = Queue()
        self.asked_to_stop = threading.Event()
        self.pipeline: Pipeline | None = None
        self._trust = contextlib.ExitStack()

    def listen(self) -> None:
        """Read the driver's messages (a thread): commands are queued; a stop is noted at
        once; the connection's end ends the process."""
        while True:
            try:
                command, args = self.connection.recv()
            except (EOFError, OSError):
                os._exit(ranks.DRIVER_GONE)  # the driver is gone: nobody will read a result
            if command == "stop":
                self.asked_to_stop.set()
                continue
            self.commands.put((command, args))
            if command == "exit":
                return  # the driver closes its end next: that EOF is not a lost driver

    def serve(self) -> None:
        """Run commands until ``exit``."""
        while True:
            command, args = self.commands.get()
            if command == "exit":
                self.close()
                return
            try:
                reply = ("done", getattr(self, f"do_{command}")(*args))
            except TrainingInterrupted as interrupted:
                reply = ("interrupted", (interrupted.checkpoint, self._position()))
            except Exception as err:
                reply = ("error", _describe(err))
            self.send(reply)
            if command == "train":
                # Cleared once the call it was sent for has answered, never before: a stop
                # sent just as the call began is not lost.
                self.asked_to_stop.clear()

    def send(self, message: tuple) -> None:
        """Send ``message`` to the driver (from any thread)."""
        with self._sending:
            self.connection.send(message)

    def _position(self) -> tuple[int, int, int]:
        strategy = self.pipeline.strategy
        return strategy.epoch, strategy.iter, strategy.step_in_epoch

    # commands -------------------------------------------------------------------------

    def do_build(
        self,
        config: dict,
        checkpoint: CheckpointRef | None,
        to_iter: int | None,
        evaluated: bool,
        trust: Trust,
    ) -> dict:
        self._trust.enter_context(held_trust(trust))
        cfg = validate(config, trust=trust)
        self.pipeline = pl.restore_here(
            cfg, checkpoint, to_iter=to_iter, evaluated=evaluated, trust=trust
        )
        return {
            "position": self._position(),
            "max_epochs": self.pipeline.max_epochs,
            "max_iters": self.pipeline.max_iters,
            "epoch_length": self.pipeline.epoch_length,
            "pending_fork": self.pipeline.pending_fork is not None,
        }

    def do_train(self, reported: bool = True) -> dict:
        """Train the epoch; with ``reported``, rank 0 sends its progress as it goes."""
        if dist.is_initialized():
            stop = AgreedStop(self.asked_to_stop, self.pipeline)
        else:
            stop = AskedStop(self.asked_to_stop)
        progress = self._progress() if reported else None
        metrics = steps.train_until_stopped(self.pipeline, stop, progress=progress)
        return {"position": self._position(), "metrics": metrics}

    def do_evaluate(self) -> dict:
        return {"metrics": steps.evaluate(self.pipeline)}

    def do_save_epoch(self, metrics: dict[str, float], background: bool) -> dict:
        return {"checkpoint": steps.save_epoch(self.pipeline, metrics, background=background)}

    def _progress(self):
        """Rank 0 reports the iterations done and the running metrics at most every
        ``PROGRESS_EVERY_S`` (with several processes, the metrics as of the last log
        interval, where every rank reads them anyway: no extra collective)."""
        strategy = self.pipeline.strategy
        log_interval = self.pipeline.config.train.log_interval
        last = {"sent": 0.0, "running": {}}

        def report(running: Mapping, step: int) -> None:
            if strategy.iter % log_interval == 0:
                last["running"] = dict(running)
            now = time.monotonic()
            if strategy.rank == 0 and now - last["sent"] >= PROGRESS_EVERY_S:
                last["sent"] = now
                if strategy.world_size == 1:  # no other rank to read them with: read now
                    last["running"] = dict(running)
                self.send(("progress", (last["running"], step)))

        return report

    def close(self) -> None:
        """Finish a background save, stop the loader workers, leave the process group."""
        if self.pipeline is not None:
            self.pipeline.strategy.wait_for_checkpoints()
            self.pipeline.close()
        self._trust.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _describe(err: BaseException) -> tuple[str, str, str, str]:
    return (
        type(err).__module__,
        type(err).__qualname__,
        str(err),
        "".join(traceback.format_exception(err)),
    )


def main() -> None:
    """Connect to the driver, then serve its commands until ``exit``."""
    die_with_parent(signal.SIGKILL)  # not Linux: a rank still exits on its EOF
    host, port = os.environ[ranks.ADDRESS_ENV].rsplit(":", 1)
    authkey = bytes.fromhex(os.environ.pop(ranks.AUTHKEY_ENV))
    connection = Client((host, int(port)), authkey=authkey)
    connection.send((int(os.environ["RANK"]), os.getpid()))
    serve(Rank(connection))
    connection.close()


def serve(rank: Rank) -> None:
    """Serve the driver's commands until ``exit`` (the driver's end closing ends the
    process)."""
    threading.Thread(target=rank.listen, name="baton-rank-listen", daemon=True).start()
    rank.serve()


if __name__ == "__main__":
    main()
