"""The process settings a strategy's ``env_kwargs`` make, as mmengine's ``_setup_env``
does for one device: seeding and determinism, cuDNN benchmarking, the open-file limit,
and ``mp_cfg``'s multiprocessing start method and OpenCV threads.

``dist_cfg`` configures a distributed launch; one device in one process has none, so a
non-empty ``dist_cfg`` is refused rather than silently ignored.
"""

import multiprocessing
import resource
import warnings

import torch

from baton import randomness

ENV_KEYS = ("randomness", "cudnn_benchmark", "mp_cfg", "dist_cfg", "resource_limit")
RANDOMNESS_KEYS = ("seed", "deterministic", "diff_rank_seed")
MP_KEYS = ("mp_start_method", "opencv_num_threads")


def check_keys(given: dict, accepted: tuple[str, ...], what: str) -> dict:
    """``given`` if it has only ``accepted`` keys.

    Raises:
        TypeError: Naming the unknown keys and the accepted ones.
    """
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(
            f"{what} got unknown key(s) {unknown}; accepted keys: {', '.join(accepted)}"
        )
    return given


def set_up(env_kwargs: dict, rank: int = 0) -> tuple[int, dict]:
    """Apply ``env_kwargs``; return the seed in effect and the randomness settings.

    Raises:
        TypeError: An unknown key.
        ValueError: A bad seed, or a non-empty ``dist_cfg``.
    """
    env = check_keys(dict(env_kwargs), ENV_KEYS, "env_kwargs")
    if env.get("dist_cfg"):
        raise ValueError(
            f"env_kwargs['dist_cfg'] ({env['dist_cfg']}) configures a distributed launch, "
            "and SingleDeviceStrategy trains in one process where it has no effect; remove "
            "dist_cfg (mmengine's single-device strategy ignores it too)"
        )
    if env.get("mp_cfg") is not None:
        set_multi_processing(**check_keys(dict(env["mp_cfg"]), MP_KEYS, "mp_cfg"))
    if env.get("cudnn_benchmark", False):
        torch.backends.cudnn.benchmark = True
    raise_open_file_limit(env.get("resource_limit", 4096))
    settings = check_keys(dict(env.get("randomness") or {}), RANDOMNESS_KEYS, "randomness")
    return seed(rank=rank, **settings)


def set_multi_processing(mp_start_method: str = "fork", opencv_num_threads: int = 0) -> None:
    """As mmengine's ``set_multi_processing`` for one process: force the start method
    (warning when it changes one already set), and OpenCV's threads if it is installed."""
    current = multiprocessing.get_start_method(allow_none=True)
    if current is not None and current != mp_start_method:
        warnings.warn(
            f"Multi-processing start method `{mp_start_method}` is different from the "
            f"previous setting `{current}`.It will be force set to `{mp_start_method}`. You "
            "can change this behavior by changing `mp_start_method` in your config.",
            stacklevel=3,
        )
    multiprocessing.set_start_method(mp_start_method, force=True)
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(opencv_num_threads)


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft limit on open files to ``wanted`` (never past the hard limit, never
    lowered): data loader workers share tensors through file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(wanted, soft)
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def seed(
    seed: int | None = None, diff_rank_seed: bool = False, deterministic: bool = False, *, rank: int
) -> tuple[int, dict]:
    """Seed every generator (a drawn seed when ``None``); the seed in effect and the
    settings to record."""
    if seed is None:
        seed = randomness.draw_seed()
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"randomness.seed must be a non-negative int or None, got {seed!r}")
    effective = seed + rank if diff_rank_seed else seed
    randomness.seed_everything(effective, deterministic=deterministic)
    return effective, {
        "seed": seed,
        "diff_rank_seed": diff_rank_seed,
        "deterministic": deterministic,
    }
