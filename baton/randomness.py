"""Seeding, capture and restore of every RNG state a training step can touch, and the
training code's own generators.

States are stored as plain Python values and tensors only, so that a checkpoint holding
them loads with ``torch.load(weights_only=True)`` (ours and mmengine's loaders alike).

A pipeline's datasets and models may draw from the global generators (``random``,
``numpy.random``, torch's default generators). Those are shared by the whole process:
Prefect's threads draw from ``random`` while a run trains (its websocket client picks
ping payloads with ``random.getrandbits``), and code between two steps may draw too. So
that such draws never change a run, a pipeline keeps its states in
:class:`TrainingGenerators`: inside :meth:`TrainingGenerators.active` they are the
global states, and draws from ``random``'s module functions by other threads go to
generators of those threads' own; outside it, the process's states are put back.
numpy's and torch's global generators are not routed per thread (nothing in Prefect
draws from them): a thread of your own that draws from them while a run trains should
use its own generator (``numpy.random.default_rng``, ``torch.Generator``).
"""

import contextlib
import functools
import os
import random
import sys
import threading
from collections.abc import Iterator

import numpy as np
import torch

# Seeds drawn when none is configured stay below 2**31, which every RNG accepts.
_MAX_SEED = 2**31 - 1


def draw_seed() -> int:
    """A fresh random seed from the OS's entropy source."""
    return random.SystemRandom().randint(0, _MAX_SEED)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally make torch deterministic.

    ``deterministic=True`` turns on ``torch.use_deterministic_algorithms``, disables the
    cuDNN autotuner and sets ``CUBLAS_WORKSPACE_CONFIG`` when it is not set already.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def set_deterministic_algorithms(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode)`` without importing the compiler stack.

    The public call also sets ``torch._inductor.config.deterministic``, and importing
    that module takes 1.5 s in every new process. When inductor is not loaded yet, only
    the eager flag is set here; :func:`sync_inductor_determinism` passes it on before a
    model is compiled.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if "torch._inductor.config" in sys.modules or setter is None:
        torch.use_deterministic_algorithms(mode)
    else:
        setter(mode, warn_only=False)


def sync_inductor_determinism() -> None:
    """Give the compiler the eager deterministic flag (call before ``torch.compile``)."""
    torch.use_deterministic_algorithms(
        torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def cpu_rng_states() -> tuple:
    """The CPU generators' states (python, numpy, torch) as their libraries give them.

    Cheap, for putting them back in this process with :func:`set_cpu_rng_states` (the
    data path does so around every batch); :func:`capture_rng_state` is the
    checkpoint-safe form, with CUDA's states too.
    """
    return random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state()


def set_cpu_rng_states(states: tuple) -> None:
    """Restore states from :func:`cpu_rng_states`."""
    python, numpy_state, torch_state = states
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)


def capture_rng_state() -> dict:
    """Every RNG state as a checkpoint-safe dict (python, numpy, torch, cuda)."""
    python, numpy_state, torch_state = cpu_rng_states()
    kind, keys, pos, has_gauss, cached = numpy_state
    state = {
        "python": _to_lists(python),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch_state,
    }
    if torch.cuda.is_initialized():  # asked first: asking is_available() loads the driver
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore states captured by :func:`capture_rng_state`.

    A CUDA state is restored only when CUDA is available; its absence on a CPU machine
    is not an error (the file may come from a GPU run).
    """
    version, internal, gauss = state["python"]
    numpy_state = state["numpy"]
    set_cpu_rng_states(
        (
            (version, tuple(internal), gauss),
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            ),
            state["torch"].cpu(),
        )
    )
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda_states[index].cpu(), device=index)


def _process_states() -> tuple:
    """Every global generator's state, as its library gives it: for putting back in this
    process (two swaps per pipeline step), not for a file (:func:`capture_rng_state`)."""
    cuda = None
    if torch.cuda.is_initialized():  # not is_available(): that loads CUDA's driver
        cuda = torch.cuda.get_rng_state_all()
    return cpu_rng_states(), cuda


def _set_process_states(states: tuple) -> None:
    cpu, cuda = states
    set_cpu_rng_states(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _to_lists(value):
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


# The instance behind ``random``'s module functions (``random.random`` is its bound method).
_SHARED_RANDOM: random.Random = random.random.__self__  # type: ignore[attr-defined]
_routing_installed = False
_owner: int | None = None  # the thread whose draws go to the shared generators
_active: "TrainingGenerators | None" = None
_own = threading.local()
# Held while a thread other than the owner draws from the shared generator, and while a
# training thread claims or releases it: deciding where a draw goes and drawing are one
# step, so no draw can land on the shared generator after a run has claimed it.
_claim = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: a claim another thread held at
    the fork would never be released there, and that thread's ownership is void."""
    global _claim, _owner, _active
    _claim = threading.Lock()
    if _owner != threading.get_ident():
        _owner, _active = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _own_generator() -> random.Random:
    generator = getattr(_own, "random", None)
    if generator is None:
        generator = _own.random = random.Random()  # seeded from the OS's entropy
    return generator


def _install_routing() -> None:
    """Route ``random``'s module functions: the owner thread's draws (and everybody's when
    no run holds the generators) go to the shared generator, others' to their own.

    Done once per process. Call sites that look the function up on the module at each
    call (``random.getrandbits(32)``, as Prefect's websocket client does) are routed;
    names bound before (``from random import random``) keep the shared generator.
    """
    global _routing_installed
    if _routing_installed:
        return
    for name in dir(random):
        method = getattr(random, name)
        if getattr(method, "__self__", None) is _SHARED_RANDOM and callable(method):
            setattr(random, name, _routed(name, method))
    _routing_installed = True


def _routed(name: str, method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        me = threading.get_ident()
        if _owner == me:  # only this thread changes the owner away from itself
            return method(*args, **kwargs)
        with _claim:
            if _owner is None:
                return method(*args, **kwargs)
        return getattr(_own_generator(), name)(*args, **kwargs)

    return call


class TrainingGenerators:
    """The global generators' states as a training run sees them, kept apart from the
    process's between the run's steps.

    Every step of a pipeline (build, resume, train, validate, save) runs inside
    :meth:`active`; what happens outside (Prefect's engine, other work in the process)
    then never shifts the run's random streams, and what the run draws never shifts
    theirs.
    """

    def __init__(self) -> None:
        # The states as :func:`_process_states` gives them; None: not captured yet
        self.state: tuple | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make these the global generators' states for the block (re-entrant).

        On entry the process's states are put aside and these restored; other threads'
        draws from ``random`` go to their own generators. On exit these are captured and
        the process's states restored.

        Raises:
            RuntimeError: Another thread is inside a training step: the global
                generators serve one training thread at a time.
        """
        global _owner, _active
        me = threading.get_ident()
        if _active is self and _owner == me:
            yield  # a step inside a step (an iteration checkpoint inside an epoch)
            return
        if _owner is not None and _owner != me:
            raise RuntimeError(
                "another thread is inside a training step; the global generators serve one "
                "training thread at a time: run pipeline steps from one thread"
            )
        _install_routing()
        previous = _active, _owner
        # Claim the shared generators before touching them: from here on, other threads
        # draw from their own, so none can draw between the swap and the first step.
        with _claim:
            _active, _owner = self, me
        try:
            outside = _process_states()
            if self.state is not None:
                _set_process_states(self.state)
            try:
                yield
            finally:
                self.state = _process_states()
                _set_process_states(outside)
        finally:
            with _claim:
                _active, _owner = previous
