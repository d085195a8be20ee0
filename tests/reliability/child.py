"""A training run that SIGKILLs itself at a chosen point (the fault-injection child).

    python -m tests.reliability.child CONFIG_JSON POINT N

POINT is where the N-th occurrence kills the process: ``iteration`` (after a training
iteration), ``validation`` (inside validation), ``checkpoint-write`` (inside a checkpoint
file's write), ``manifest-update`` (half of a manifest journal record written), ``rotation`` (commit
recorded, old file not yet deleted), or ``none``.
Everything is patched here, in the throw-away child; the engine has no fault hooks.
"""

import json
import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    from baton.checkpoint import atomic, manifest, retention
    from baton.run import loop

    count = {"n": 0}

    def tick() -> None:
        count["n"] += 1
        if count["n"] == n:
            die()

    if point == "iteration":
        original = loop.train_epoch

        def train_epoch(*args, on_iteration=None, **kwargs):
            def hook(running):
                if on_iteration is not None:
                    on_iteration(running)
                tick()

            return original(*args, on_iteration=hook, **kwargs)

        loop.train_epoch = train_epoch
    elif point == "validation":
        original_evaluate = loop.evaluate

        def evaluate(strategy, loader, **kwargs):
            handle = strategy.model.register_forward_hook(lambda *args: tick())
            try:
                return original_evaluate(strategy, loader, **kwargs)
            finally:
                handle.remove()

        loop.evaluate = evaluate
    elif point == "checkpoint-write":
        original_write = atomic._HashingWriter._write

        def write(self, data):
            result = original_write(self, data)
            tick()
            return result

        atomic._HashingWriter._write = write
    elif point == "manifest-update":
        original_append = manifest.append_record

        def append_record(fd, line):
            count["n"] += 1
            if count["n"] == n:  # half a journal record on disk, then death
                os.write(fd, line[: len(line) // 2])
                os.fsync(fd)
                die()
            original_append(fd, line)

        manifest.append_record = append_record
    elif point == "rotation":
        original_unlink = retention._unlink_in

        def unlink_in(dir_fd, name):
            tick()
            original_unlink(dir_fd, name)

        retention._unlink_in = unlink_in
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")


def main() -> None:
    config, point, n = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    from baton.config import validate
    from baton.run import pipeline as pl

    arm(point, n)
    pl.run(validate(config))


if __name__ == "__main__":
    main()
