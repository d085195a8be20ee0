"""The training pipeline flow: validate the config, resume, prepare, train epoch by epoch.

Parameters are flat on purpose: the Prefect server merges a run's parameters with the
deployment's defaults one level deep, so a nested config object sent partially would
silently reset its other fields. Here each parameter stands alone.
"""

import contextlib
import functools
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.exceptions import Abort, TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled, Crashed, State
from prefect.utilities.annotations import quote

from baton.config.schema import PipelineConfig
from baton.errors import ExperimentLockedError, RestartRefusedError
from baton.experiment import Experiment
from baton.experiment.restarts import RestartBound
from baton.flows.pool import checked_run, read_run, work_dir_of
from baton.flows.run_record import RecentEvents, recording
from baton.flows.watch import RunWatch
from baton.run import control
from baton.run.interrupt import StopRequest, TrainingInterrupted, deferred_termination
from baton.tasks import (
    EpochReporter,
    RunState,
    evaluate,
    find_resume_point,
    prepare,
    save_checkpoint,
    summarize,
    train_epoch,
    validate_config,
)
from baton.tasks._common import permanent_errors_end_the_run, run_logger
from baton.tasks.state import config_of, forget
from baton.trust import deployment_environment


class _RunFormatter(logging.Formatter):
    """Names the task or flow run a record comes from (Prefect puts it in the record)."""

    def format(self, record: logging.LogRecord) -> str:
        record.run = getattr(record, "task_run_name", None) or getattr(
            record, "flow_run_name", record.name
        )
        return super().format(record)


@contextlib.contextmanager
def _run_log_file(experiment: Experiment) -> Iterator[None]:
    """Copy this flow run's log lines (flow, tasks, engine) into the experiment folder."""
    path = experiment.flow_log_path(flow_run.get_id())
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_RunFormatter("%(asctime)s %(levelname)s %(run)s %(message)s"))
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs", "baton")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def restart_name(crashed: str) -> str:
    """The name of an automatic restart of the run called ``crashed``: a chain of restarts
    keeps the first run's name and counts up (``brave-fox-restart-1``, ``-restart-2``), so
    the UI lists them together. Names are only shown, never used as paths."""
    crashed = re.sub(r"[^\w.-]+", "-", crashed)[:80]
    base, _, count = re.fullmatch(r"(.*?)(-restart-(\d+))?", crashed).groups()
    return f"{base}-restart-{int(count or 0) + 1}"


def _run_name() -> str:
    """Prefect's own run name, or the restart's name when the restart automation started it."""
    restart_of = flow_run.get_parameters().get("restart_of")
    if not restart_of:
        return flow_run.get_name()
    crashed = read_run(restart_of)
    if crashed is None:
        return restart_name(str(restart_of))
    with contextlib.suppress(Exception):  # a name is not worth a failed run
        if _earlier_restart(crashed, read_run(flow_run.get_id())) is not None:
            return flow_run.get_name()  # it gives way to that one: the name is that one's
    return restart_name(crashed.name)


def _stops_end_cleanly(
    fn: Callable[..., RunState | State],
) -> Callable[..., RunState | State]:
    """End a run that stopped on purpose (a cancel, a SIGTERM, its worker gone) in the
    state that says what happened, with one log line instead of a crash's traceback.

    Prefect tells a cancel from other terminations through a handshake that its own
    SIGTERM handler must answer; while baton defers the signal to the end of an
    iteration, its handler is installed instead, so Prefect would report the cancel as
    a crash, and the restart automation would start the run again. The run's state on
    the server (Cancelling) says what Prefect's handshake would have said. A deployment's
    run sets its final state itself and leaves through Prefect's ``Abort`` (one INFO
    line); a run outside deployments (``baton run``) returns it.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> RunState | State:
        try:
            return fn(*args, **kwargs)
        except TerminationSignal as signalled:
            stopped = _stop_of(signalled)
            # A cancel the watch saw is one even if the server's state moved on since.
            cancelled = _being_cancelled() or (stopped is not None and stopped.reason == "cancel")
            if stopped is not None and stopped.reason == "crashed" and not cancelled:
                # The server has its final state already; the automation restarts it.
                crashed = read_run(flow_run.get_id())
                if crashed is not None and crashed.state is not None:
                    abort = Abort(crashed.state.message or "Crashed")
                    abort.state = crashed.state
                    raise abort from None
            if _deployment_id() is None or stopped is None:
                if cancelled:
                    return Cancelled(message=_stop_message(stopped, "cancel"))
                raise
            if cancelled:
                final = Cancelled(message=_stop_message(stopped, "cancel"))
            else:
                final = _interrupted(stopped, stopped.reason or "signal")
            accepted = _set_final_state(final)
            if accepted is None:
                raise
            abort = Abort(final.message)
            abort.state = accepted  # Prefect's engine: the API has the final state already
            raise abort from None

    return run


def _end(state: State) -> State:
    """End the run in ``state`` with no traceback: a deployment's run sets it on the
    server and leaves through Prefect's ``Abort`` (a returned Cancelled state would make
    Prefect's engine log an ERROR); any other run returns it."""
    if _deployment_id() is None:
        return state
    accepted = _set_final_state(state)
    if accepted is None:
        return state
    abort = Abort(state.message)
    abort.state = accepted  # Prefect's engine: the API has the final state already
    raise abort


def _earlier_restart(crashed: FlowRun, this: FlowRun | None) -> FlowRun | None:
    """Another run that continues ``crashed`` and was created before this one (and is
    not Cancelled or Failed), if any. Only a run with this run's parameters counts: one
    with others is refused as a restart (it fails on its own), and must not make this one
    give way while it has not failed yet."""
    if this is None:
        return None
    mine = {key: (this.parameters or {}).get(key) for key in _REPEATED}
    others = [
        run
        for run in _restarts_of(crashed)
        if run.id != this.id
        and run.created < this.created
        and {key: (run.parameters or {}).get(key) for key in _REPEATED} == mine
        and not (run.state and (run.state.is_cancelled() or run.state.is_failed()))
    ]
    return min(others, key=lambda run: run.created, default=None)


def _restarts_of(crashed: FlowRun) -> list[FlowRun]:
    """The runs of ``crashed``'s deployment created to continue it."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    if crashed.deployment_id is None:
        return []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(after_=crashed.created)
            ),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[crashed.deployment_id])),
            limit=200,
        )
    return [r for r in runs if str((r.parameters or {}).get("restart_of")) == str(crashed.id)]


def _deployment_id() -> Any:
    """The deployment this flow run belongs to (None for runs outside deployments)."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    return run.deployment_id if run is not None else None


def _stop_of(exc: BaseException) -> TrainingInterrupted | None:
    """The stop a termination signal ends (the exception it was raised over)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, TrainingInterrupted):
            return seen
        seen = seen.__context__
    return None


def _stop_message(
    stopped: TrainingInterrupted | None, reason: str, restart: str = "baton-restart-crashed-runs"
) -> str:
    """What happened, in the words of the run's final state."""
    what = {
        "cancel": "Cancelled",
        "worker": "Its worker died; stopped",
        "signal": "Stopped by SIGTERM (not a cancel)",
        "lease": "The server lost its concurrency slot; stopped",
    }.get(reason, "Stopped")
    after = "" if reason == "cancel" else f" {restart} continues it from there."
    if stopped is None or stopped.position is None:
        return f"{what}.{after}"
    epoch, iteration, max_iters = stopped.position
    ref = stopped.checkpoint
    if ref is None:
        held = "no checkpoint holds it"
    elif stopped.saved_now:
        held = f"emergency checkpoint {ref.uri.rsplit('/', 1)[-1]} committed"
    else:
        held = f"checkpoint {ref.uri.rsplit('/', 1)[-1]} already holds it"
    return f"{what} at iteration {iteration}/{max_iters} (epoch {epoch} done): {held}.{after}"


# The name of the Crashed state a run gives itself when it stopped on purpose (a SIGTERM
# that is not a cancel, its worker gone) and created its own restart: the restart
# automation reacts to Crashed-named states only, so it does not create a second one.
INTERRUPTED = "Interrupted"


def _interrupted(stopped: TrainingInterrupted, reason: str) -> State:
    """The Crashed state of a run that stopped on purpose, its restart created here, so
    that the restart carries its name from the moment it exists (Prefect's automations
    cannot name the runs they create). Without a restart (it could not be created), a
    plain Crashed state: baton-restart-crashed-runs then creates it."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            this = client.read_flow_run(flow_run.get_id())
            theirs = this.parameters or {}
            name = restart_name(this.name)
            # This run was marked Crashed while it lived: the automation's restart is
            # taken over (named as this one's would be) instead of making a second.
            waiting = [r for r in _restarts_of(this) if r.state and r.state.is_scheduled()]
            if waiting:
                restart = min(waiting, key=lambda run: run.created)
                client.update_flow_run(restart.id, name=name)
                restart.name = name
            else:
                restart = client.create_flow_run_from_deployment(
                    this.deployment_id,
                    parameters={
                        **{k: theirs.get(k) for k in _REPEATED},
                        "restart_of": str(this.id),
                    },
                    name=name,
                    idempotency_key=f"baton-restart-of-{this.id}",
                )
        # One the automation makes later still gives way to this one when it starts
        # (_earlier_restart): the first created goes on, the other ends Cancelled.
    except Exception as err:
        run_logger().warning("could not create the restart (%s): the automation will", err)
        return Crashed(message=_stop_message(stopped, reason))
    return Crashed(name=INTERRUPTED, message=_stop_message(stopped, reason, restart.name))


def _set_final_state(state: State) -> State | None:
    """Propose the run's final state to the server: the state it holds now, or None when
    it could not be set."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            result = client.set_flow_run_state(flow_run.get_id(), state)
    except Exception:
        return None
    return result.state if result.status.value == "ACCEPT" else None


def _being_cancelled() -> bool:
    """Whether this flow run is Cancelling on the server (False when that cannot be read)."""
    run_id = flow_run.get_id()
    this = read_run(run_id) if run_id else None
    return this is not None and this.state is not None and this.state.is_cancelling()


# A flow retry starts again from the newest checkpoint; a run may not ask for more.
FLOW_RETRIES = 1


@flow(
    name="train-pipeline",
    flow_run_name=_run_name,
    retries=FLOW_RETRIES,
    retry_delay_seconds=0,
    log_prints=True,
)
@_stops_end_cleanly
def train_pipeline(
    config: str | dict[str, Any] = "configs/digits_mlp.yaml",
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    resume: str | None = None,
    work_dir: str | None = None,
    restart_of: str | None = None,
    fork: bool | None = None,
    nproc: int | None = None,
) -> RunState | State:
    """Train a pipeline to its horizon, continuing from the experiment's newest checkpoint.

    Args:
        config: Path of a YAML file in configs/, YAML text, or an inline mapping.
        overrides: Dotted-key overrides, e.g. train.max_epochs=20 or optim_wrapper.optimizer.lr=0.01.
        experiment_name: Overrides the config's experiment_name (the folder checkpoints go to).
        resume: 'auto' (newest valid checkpoint), 'never', or a checkpoint path; default: the config's.
        work_dir: Overrides the config's work_dir; a deployment's runs keep their experiments in its own folder (leave empty).
        restart_of: Set by the restart automation: the id of the crashed run this continues. Leave empty.
        fork: True continues from the checkpoint even where the config changes the run
            (data, optimizer, schedule, seed...), recorded as a fork; default: the config's.
        nproc: Training processes, one per device (bounded by the operator's max_processes); default: the config's launcher.nproc.
    """
    started = time.time()
    settings = {
        "experiment_name": experiment_name,
        "resume": resume,
        "work_dir": work_dir,
        "fork": fork,
        "nproc": nproc,
    }
    with permanent_errors_end_the_run():
        this, deployment = checked_run(retries=FLOW_RETRIES)
        with deployment_environment(deployment):
            crashed = None
            if restart_of:
                crashed = _crashed_run(restart_of, this)
                if not crashed.state.is_crashed():
                    # A cancel whose process outlived Prefect's grace period is killed,
                    # reported Crashed, then Cancelled: the person asked for it to stop.
                    return _end(
                        Cancelled(
                            message=f"Not restarting {crashed.name!r}: "
                            f"it is {crashed.state.name} now."
                        )
                    )
                earlier = _earlier_restart(crashed, this)
                if earlier is not None:
                    # The run stopped on purpose and created its restart, and the restart
                    # automation made one too (or the other way round): the first goes on.
                    return _end(
                        Cancelled(
                            message=f"Not restarting {crashed.name!r}: {earlier.name} continues it."
                        )
                    )
            settings["work_dir"] = work_dir_of(deployment, work_dir)
            cfg = validate_config(config, overrides, settings)
            # _train ends the live pipeline (loader workers, training processes) whatever
            # ends the run, inside: the run's trust is held here.
            state = _train(cfg, started, crashed)
    return state


# The parameters a restart repeats from the run it continues (all but restart_of).
_REPEATED = ("config", "overrides", "experiment_name", "resume", "work_dir", "fork", "nproc")


def _crashed_run(restart_of: str, this: FlowRun | None) -> FlowRun:
    """The run ``restart_of`` names, if this run may restart it: a run of the same
    deployment with the same parameters (so of the same experiment).

    Raises:
        RestartRefusedError: Before anything is counted, with the reason.
    """
    crashed = read_run(restart_of)
    if crashed is None or crashed.state is None:
        raise RestartRefusedError(
            f"restart_of={restart_of[:80]!r} is not the id of a flow run on this "
            "server; leave it empty (the restart automation sets it)"
        )
    deployment = this.deployment_id if this is not None else None
    if crashed.deployment_id != deployment or crashed.flow_id != getattr(this, "flow_id", None):
        raise RestartRefusedError(
            f"restart_of names {crashed.name!r}, a run of another deployment; a restart "
            "continues a crashed run of its own deployment: leave restart_of empty"
        )
    mine = (this.parameters if this is not None else None) or {}
    theirs = crashed.parameters or {}
    differ = [k for k in _REPEATED if mine.get(k) != theirs.get(k)]
    if differ:
        raise RestartRefusedError(
            f"restart_of names {crashed.name!r}, which ran with other {', '.join(differ)}; "
            "a restart repeats the crashed run's parameters: leave restart_of empty"
        )
    return crashed


def _origin(crashed: FlowRun) -> str:
    """The run a chain of automatic restarts started from: its id marks the lineage the
    crashed run was writing, so that the restart continues it (a run that started
    fresh or branched would otherwise start yet another lineage)."""
    run = crashed
    for _ in range(32):  # restarts are bounded; a cycle of ids cannot loop forever
        parent_id = (run.parameters or {}).get("restart_of")
        parent = read_run(parent_id) if parent_id else None
        if parent is None:
            break
        run = parent
    return str(run.id)


class _FlowSteps:
    """The run's steps as tasks (see baton.run.control): each one a task run in the UI."""

    def __init__(self, cfg: dict[str, Any], reporter: EpochReporter) -> None:
        # Prefect walks every parameter of a task run twice, looking for futures and
        # upstream results (~3 ms for a config, twice per epoch). The config is the flow's
        # own, validated once (prepare's edge from validate-config shows where it comes
        # from): quoted, it is handed to each epoch's tasks as it is.
        self.cfg = quote(cfg)
        self.reporter = reporter

    def position(self, state: RunState) -> tuple[int, bool]:
        return state.epoch, state.finished

    def train(self, state: RunState, epoch: int) -> RunState:
        result = train_epoch(self.cfg, state, epoch)
        if isinstance(result, State):  # "Stopped": a SIGTERM ended the epoch early
            stopped = result.result()
            interrupted = TrainingInterrupted(result.message)
            interrupted.checkpoint = stopped.checkpoint
            interrupted.position = (stopped.epoch, stopped.iter, stopped.max_iters)
            raise interrupted
        return result

    def evaluate(self, state: RunState, epoch: int) -> RunState:
        return evaluate(self.cfg, state, epoch)

    def save(self, state: RunState, epoch: int, background: bool) -> RunState:
        return save_checkpoint(self.cfg, state, epoch, background)

    def report(self, state: RunState) -> None:
        self.reporter.report(state)


def _checkpoint_then_stop(cfg: dict[str, Any], stop: StopRequest):
    """Before each epoch: a SIGTERM that came between tasks saves the position (unless a
    checkpoint already holds it) and then goes on to Prefect."""

    def before_epoch(state: RunState) -> RunState:
        if stop.requested:
            saved_now = state.checkpoint is None or state.checkpoint.iter != state.iter
            if saved_now:
                state = save_checkpoint(cfg, state, state.epoch)
            try:
                stop.check()
            except TrainingInterrupted as interrupted:
                interrupted.checkpoint = state.checkpoint
                interrupted.position = (state.epoch, state.iter, state.max_iters)
                interrupted.saved_now = saved_now
                raise
        return state

    return before_epoch


@contextlib.contextmanager
def _watched(
    experiment: Experiment, reporter_box: list[EpochReporter]
) -> Iterator[RunWatch | None]:
    """Watch this run from a thread of its own while it trains (deployments' runs:
    see baton.flows.watch), and send again what the server lost in an outage."""
    deployment_id = _deployment_id()
    run_id = flow_run.get_id()
    if deployment_id is None or run_id is None:
        yield None
        return
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker

    recent = RecentEvents()

    def after_outage(seconds: float) -> None:
        from prefect import get_client

        for reporter in reporter_box:
            reporter.republish()
        # What Prefect's client held during the outage reaches the server first; only
        # what is still missing after that is sent again.
        time.sleep(RESEND_AFTER_S)
        with get_client(sync_client=True) as api:
            sent = recent.send_missing(api, EventsWorker.instance(PrefectEventsClient).send)
        if sent:
            run_logger().info(
                "sent again %d event(s) the server lost while it was down (%.0f s)", sent, seconds
            )

    watch = RunWatch(
        run_id,
        deployment_id,
        experiment.runs_dir / f"flow-{run_id}.out",
        on_reconnect=after_outage,
        on_unreachable=recent.hold,
    )
    with recording(recent):
        watch.start()
        try:
            yield watch
        finally:
            watch.stop()


# How long a run that finished during an outage waits for the server to come back.
SERVER_WAIT_S = 600.0
# How long a stopping run (a cancel, a SIGTERM) waits for its last artifacts.
STOP_CLOSE_TIMEOUT_S = 5.0
# How long after an outage the run looks for the events the server lost: the events
# Prefect's client held meanwhile arrive and are written first (the server writes its
# queue every 5 s by default).
RESEND_AFTER_S = 15.0


# How long a restart waits for the run it continues to let go of the experiment (a run
# that stopped on purpose, still writing its emergency checkpoint when the restart came).
RESTART_LOCK_WAIT_S = 120.0


@contextlib.contextmanager
def _locked(experiment: Experiment, crashed: FlowRun | None) -> Iterator[None]:
    """Hold the experiment's lock; a restart waits a while for it (RESTART_LOCK_WAIT_S),
    any other run fails at once when another process holds it."""
    deadline = time.monotonic() + (RESTART_LOCK_WAIT_S if crashed is not None else 0.0)
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(experiment.lock())
                break
            except ExperimentLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)
        yield


def _stop_after_training(state: RunState, stop: StopRequest, watch: RunWatch | None) -> None:
    """A stop that came once training had reached its horizon: a cancel ends the run
    Cancelled (the server holds it Cancelling), anything else lets it end Completed
    rather than restart a finished run."""
    if (watch is not None and watch.reason == "cancel") or _being_cancelled():
        interrupted = TrainingInterrupted("cancelled after training")
        interrupted.checkpoint = state.checkpoint
        interrupted.position = (state.epoch, state.iter, state.max_iters)
        interrupted.saved_now = False
        raise interrupted
    run_logger().info("a SIGTERM came after training had reached its horizon: the run ends")
    stop.signum = None


@contextlib.contextmanager
def _forgotten_at_end(config: PipelineConfig) -> Iterator[None]:
    """End the run's live pipeline (its training processes, their last log lines in the
    run's log) while the run still holds the experiment: a Ctrl-C or any error included."""
    try:
        yield
    finally:
        forget(config)


def _train(cfg: dict[str, Any], started: float, crashed: FlowRun | None) -> RunState:
    """Hold the experiment, resume, train epoch by epoch, checkpoint, report."""
    config = config_of(cfg)
    experiment = Experiment.of(config)
    reporters: list[EpochReporter] = []
    # A SIGTERM (cancel, preemption) between tasks waits for the current task; inside the
    # training task it waits for the current iteration, then an emergency checkpoint.
    with (
        _locked(experiment, crashed),
        _run_log_file(experiment),
        _forgotten_at_end(config),
        deferred_termination() as stop,
        _watched(experiment, reporters) as watch,
    ):
        run_id = None
        if crashed is not None:
            if not experiment.ran(str(crashed.id)):
                raise RestartRefusedError(
                    f"not restarting {crashed.name!r}: it never trained experiment "
                    f"{experiment.name!r}; start the run by hand"
                )
            bound = RestartBound.from_env()
            count = experiment.restarts.claim(
                str(flow_run.get_id()), crashed.name, bound, continues_id=str(crashed.id)
            )
            print(f"automatic restart {count}/{bound.limit} of crashed run {crashed.name!r}")
            run_id = _origin(crashed)
        state = prepare(cfg, find_resume_point(cfg, run_id))
        reporter = EpochReporter(cfg)
        reporters.append(reporter)
        stopping = False
        try:
            reporter.start(state)
            if state.finished:
                print(f"{cfg['experiment_name']} is already complete at epoch {state.epoch}")
                note = "Already complete: nothing left to train."
                tracking = reporter.end_tracking(finished=True)
                reporter.finish(state, summarize(cfg, state, started, note, tracking))
                return state
            steps = _FlowSteps(cfg, reporter)
            before_epoch = _checkpoint_then_stop(cfg, stop)
            state = control.train_to_horizon(config, state, steps, before_epoch=before_epoch)
            tracking = reporter.end_tracking(finished=state.finished)
            reporter.finish(state, summarize(cfg, state, started, tracking=tracking))
            if stop.requested:
                stopping = True
                _stop_after_training(state, stop, watch)
        except TrainingInterrupted as interrupted:
            interrupted.reason = watch.reason if watch is not None else None
            raise
        finally:
            if stopping or stop.requested:
                # Prefect's grace period after a SIGTERM is 30 s: the checkpoint is
                # committed, the artifacts get what is left of it.
                reporter.close(STOP_CLOSE_TIMEOUT_S)
            else:
                if watch is not None:  # the server records the run's end, if it is back
                    watch.wait_for_server(SERVER_WAIT_S)
                reporter.close()
    return state
