"""What a run sent to Prefect's server, and what of it the server has not recorded yet.

``RunRecord`` is the evidence: the events, task-run states and log lines this process
sent. :func:`missing_from` asks the server's API which of them its database does not
hold yet: the event persister's rows, the task-run recorder's states, and the log lines,
each in requests of at most one API page.
"""

import contextlib
import dataclasses
import datetime
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx

# Per request: the API pages at 200 rows, and ids go into one SQL `IN (...)`; events
# come at most 50 to a page.
_PAGE = 200
_EVENTS_PAGE = 50


def _chunks(items: list, size: int = _PAGE) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclasses.dataclass(eq=False)  # hashed by identity: Prefect keys its workers on it
class RunRecord:
    """Everything this process sent to the server, as the evidence that it was recorded.

    Attributes:
        events: Each event's id and the time it occurred (the event persister's rows).
        task_run_states: For each task run, the id of its newest state event: the
            task-run recorder stores each state under its event's id, and keeps the
            newest as the task run's state.
        log_lines: Log lines per flow run (or per task run, for logs outside a flow).
    """

    events: dict[uuid.UUID, datetime.datetime] = dataclasses.field(default_factory=dict)
    task_run_states: dict[uuid.UUID, tuple[datetime.datetime, uuid.UUID]] = dataclasses.field(
        default_factory=dict
    )
    log_lines: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add_event(self, event: Any) -> None:
        """Note an event (a ``prefect.events.Event``) about to go to the server."""
        with self._lock:
            self.events[event.id] = event.occurred
            # The events the task-run recorder turns into task runs: its own filter.
            resource = event.resource
            if not (
                event.event.startswith("prefect.task-run.")
                and resource.get("prefect.orchestration") == "client"
            ):
                return
            try:
                task_run_id = uuid.UUID(resource.id.rsplit(".", 1)[1])
            except ValueError:  # not a task run the recorder could store either
                return
            newest = self.task_run_states.get(task_run_id)
            if newest is None or event.occurred >= newest[0]:
                self.task_run_states[task_run_id] = (event.occurred, event.id)

    def add_log(self, log: dict[str, Any]) -> None:
        """Note a log line (a ``LogCreate`` as JSON) about to go to the server."""
        if log.get("flow_run_id"):
            key = ("flow_run_id", str(log["flow_run_id"]))
        elif log.get("task_run_id"):
            key = ("task_run_id", str(log["task_run_id"]))
        else:  # a worker's own log: no run to find it by, and `baton run` has no worker
            return
        with self._lock:
            self.log_lines[key] += 1

    def copy(self) -> "RunRecord":
        with self._lock:
            return RunRecord(dict(self.events), dict(self.task_run_states), Counter(self.log_lines))

    def __bool__(self) -> bool:
        return bool(self.events or self.task_run_states or self.log_lines)

    def summary(self) -> str:
        return (
            f"{len(self.events)} events, {len(self.task_run_states)} task-run states, "
            f"{sum(self.log_lines.values())} log lines"
        )


class RecentEvents:
    """The events this process sent lately, to send again those a server lost.

    A Prefect server that stops (an upgrade, a restart) drops the events it had received
    but not yet written ("Max flush retries (5) reached, dropping N events"): task-run
    states, heartbeats. Prefect's client only sends again what the server never
    confirmed. This keeps every event sent in the last ``window_s`` seconds, and every
    event sent while the server could not be reached (:meth:`hold`), so that once it
    answers again :meth:`send_missing` sends again those its database lacks.
    """

    def __init__(self, window_s: float = 120.0) -> None:
        self.window_s = window_s
        self._events: dict[uuid.UUID, tuple[float, Any]] = {}
        self._held_since: float | None = None
        self._lock = threading.Lock()

    def add_event(self, event: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self._events[event.id] = (now, event)
            keep_from = now - self.window_s
            if self._held_since is not None:
                keep_from = min(keep_from, self._held_since - self.window_s)
            oldest = next(iter(self._events.values()))[0]
            if oldest < keep_from:
                self._events = {k: v for k, v in self._events.items() if v[0] >= keep_from}

    def add_log(self, log: dict[str, Any]) -> None:
        """Log lines are not kept: the experiment's ``runs/`` folder has them all."""

    def hold(self) -> None:
        """Keep every event from now on (the server does not answer)."""
        with self._lock:
            if self._held_since is None:
                self._held_since = time.monotonic()

    def send_missing(self, server_api: Any, send: Any) -> int:
        """Send again (through ``send``) the kept events the server's database lacks,
        then stop holding; return how many were sent."""
        with self._lock:
            kept = {event.id: event for _, event in self._events.values()}
            self._held_since = None
        record = RunRecord()
        for event in kept.values():
            record.add_event(event)
        missing = missing_from(server_api, record)
        lost = set(missing.events) | {state for _, state in missing.task_run_states.values()}
        # Not heartbeats: late, they would reopen heartbeat windows that ran out already.
        lost = {i for i in lost if kept[i].event != "prefect.flow-run.heartbeat"}
        for event_id in sorted(lost, key=lambda i: kept[i].occurred):
            send(kept[event_id])
        return len(lost)


def missing_from(server_api: Any, record: RunRecord) -> RunRecord:
    """What of ``record`` the server has not written to its database yet (one pass).

    Args:
        server_api: A synchronous Prefect client pointed at the server.
        record: What was sent.
    """
    missing = RunRecord()
    if record.events:
        _add_missing_events(server_api, record, missing)
    if record.task_run_states:
        _add_missing_task_run_states(server_api, record, missing)
    if record.log_lines:
        _add_missing_log_lines(server_api, record, missing)
    return missing


def _add_missing_events(server_api: Any, record: RunRecord, missing: RunRecord) -> None:
    """The event persister's table, counted by id over the events' time span."""
    since = min(record.events.values()) - datetime.timedelta(minutes=1)
    until = max(record.events.values()) + datetime.timedelta(minutes=1)
    for chunk in _chunks(sorted(record.events), _EVENTS_PAGE):
        body = {
            "filter": {
                "id": {"id": [str(i) for i in chunk]},
                "occurred": {"since": since.isoformat(), "until": until.isoformat()},
            },
            "limit": 1,
        }
        response = server_api.request("POST", "/events/filter", json=body)
        if response.json()["total"] < len(chunk):
            # Which ones, only now that something is missing: one page per chunk.
            body["limit"] = _EVENTS_PAGE
            found = server_api.request("POST", "/events/filter", json=body).json()
            persisted = {uuid.UUID(e["id"]) for e in found["events"]}
            missing.events.update({i: record.events[i] for i in chunk if i not in persisted})


def _add_missing_task_run_states(server_api: Any, record: RunRecord, missing: RunRecord) -> None:
    """The task-run recorder's states: each task run's newest state, by its event's id."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    for chunk in _chunks(sorted(record.task_run_states)):
        runs = server_api.read_task_runs(
            task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=chunk)), limit=_PAGE
        )
        current = {run.id: run.state_id for run in runs}
        for task_run_id in chunk:
            occurred, state_id = record.task_run_states[task_run_id]
            if current.get(task_run_id) == state_id:
                continue
            # Not the task run's state (yet): look the state up itself, which also
            # finds it where the recorder merged the run into an earlier one.
            try:
                server_api.request("GET", "/task_run_states/{id}", path_params={"id": state_id})
            except httpx.HTTPStatusError as err:
                if err.response.status_code != 404:
                    raise
                missing.task_run_states[task_run_id] = (occurred, state_id)


def _add_missing_log_lines(server_api: Any, record: RunRecord, missing: RunRecord) -> None:
    """The log lines of each flow run (or task run), by their count."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTaskRunId

    for (field, run_id), count in record.log_lines.items():
        ids = [uuid.UUID(run_id)]
        log_filter = (
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))
            if field == "flow_run_id"
            else LogFilter(task_run_id=LogFilterTaskRunId(any_=ids))
        )
        # The server writes logs before it answers their POST: a line that is not
        # there now was refused. The count-th line exists iff all of them do.
        if not server_api.read_logs(log_filter=log_filter, offset=count - 1, limit=1):
            missing.log_lines[(field, run_id)] = count


@contextlib.contextmanager
def recording(record: "RunRecord | RecentEvents") -> Iterator[None]:
    """Note in ``record`` every event and log line Prefect's client sends.

    Through the hooks Prefect itself uses to forward a subprocess's events and logs
    (its process-pool task runner): the events worker's client override, here the
    forwarding client, whose queue notes each event and hands it to an events worker
    that sends it; and the API log sink.
    """
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker, ProcessPoolForwardingEventsClient
    from prefect.logging.handlers import APILogWorker, set_api_log_sink

    class Ledger:  # the forwarding client's queue
        def put(self, item: tuple[str, Any]) -> None:
            _, event = item
            record.add_event(event)
            try:
                EventsWorker.instance(PrefectEventsClient).send(event)
            except RuntimeError:  # stopped (drained) since it was looked up: a new one
                EventsWorker.instance(PrefectEventsClient).send(event)

    def sink(log: dict[str, Any]) -> None:
        record.add_log(log)
        APILogWorker.instance().send(log)

    EventsWorker.set_client_override(ProcessPoolForwardingEventsClient, event_queue=Ledger())
    set_api_log_sink(sink)
    try:
        yield
    finally:
        set_api_log_sink(None)
        EventsWorker.set_client_override(None)
