"""The restart bound: counting an experiment's automatic restarts within a window."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from baton.errors import RestartRefusedError
from baton.experiment.restarts import RestartBound, RestartLog

NOON = datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_restarts_are_counted_until_the_bound(tmp_path):
    log = RestartLog(tmp_path / "runs" / "restarts.json")
    bound = RestartBound(limit=2, window=timedelta(hours=24))
    assert log.claim("run-1", "fox", bound, now=NOON) == 1
    assert log.claim("run-2", "fox-restart-1", bound, now=NOON + timedelta(minutes=2)) == 2
    with pytest.raises(RestartRefusedError, match=r"restarted automatically 2 times in 24 h .*fox"):
        log.claim("run-3", "fox-restart-2", bound, now=NOON + timedelta(minutes=4))
    assert [r.run for r in log.restarts()] == ["run-1", "run-2"]  # a refusal records nothing


def test_a_flow_retry_of_the_same_run_counts_once(tmp_path):
    log = RestartLog(tmp_path / "runs" / "restarts.json")
    bound = RestartBound(limit=1)
    assert log.claim("run-1", "fox", bound, now=NOON) == 1
    assert log.claim("run-1", "fox", bound, now=NOON + timedelta(seconds=1)) == 1


def test_restarts_older_than_the_window_no_longer_count(tmp_path):
    log = RestartLog(tmp_path / "runs" / "restarts.json")
    bound = RestartBound(limit=1, window=timedelta(hours=24))
    log.claim("run-1", "fox", bound, now=NOON)
    assert log.claim("run-2", "fox", bound, now=NOON + timedelta(hours=24)) == 1
    assert [r.run for r in log.restarts()] == ["run-2"]  # old entries are dropped


def test_limit_zero_refuses_every_restart(tmp_path):
    with pytest.raises(
        RestartRefusedError, match=r"automatic restarts are off \(BATON_RESTART_LIMIT=0\)"
    ):
        RestartLog(tmp_path / "runs" / "restarts.json").claim(
            "run-1", "fox", RestartBound(limit=0), now=NOON
        )


@pytest.mark.parametrize("content", ["{", '{"restarts": [{"time": "soon"}]}', "[]"])
def test_an_unreadable_log_refuses_the_restart_and_says_how_to_recover(tmp_path, content):
    log = RestartLog(tmp_path / "runs" / "restarts.json")
    log.path.parent.mkdir(parents=True)
    log.path.write_text(content)
    with pytest.raises(RestartRefusedError, match="unreadable .* delete it"):
        log.claim("run-1", "fox", RestartBound(), now=NOON)


def test_a_hostile_crashed_run_name_is_stored_bounded_and_escaped(tmp_path):
    log = RestartLog(tmp_path / "runs" / "restarts.json")
    log.claim("run-1", '"}\n' + "x" * 10_000, RestartBound(), now=NOON)
    (restart,) = json.loads(log.path.read_text())["restarts"]
    assert len(restart["continues"]) == 200


def test_the_bound_comes_from_the_operators_environment():
    assert RestartBound.from_env({}) == RestartBound(limit=3, window=timedelta(hours=24))
    bound = RestartBound.from_env({"BATON_RESTART_LIMIT": "5", "BATON_RESTART_WINDOW_HOURS": "1.5"})
    assert bound == RestartBound(limit=5, window=timedelta(minutes=90))
    with pytest.raises(ValueError, match="BATON_RESTART_LIMIT='three'.*e.g. 3 and 24"):
        RestartBound.from_env({"BATON_RESTART_LIMIT": "three"})
    with pytest.raises(ValueError, match="must not be negative"):
        RestartBound.from_env({"BATON_RESTART_LIMIT": "-1"})


def test_a_crashed_run_is_restarted_once_however_many_runs_claim_it(tmp_path):
    log = RestartLog(tmp_path / "runs" / "restarts.json")
    bound = RestartBound(limit=3)
    assert log.claim("run-1", "fox", bound, now=NOON) == 1
    for other in ("run-2", "run-3", "run-4"):
        with pytest.raises(
            RestartRefusedError, match="crashed run 'fox' was already restarted by run 'run-1'"
        ):
            log.claim(other, "fox", bound, now=NOON + timedelta(minutes=1))
    assert [r.run for r in log.restarts()] == ["run-1"]  # the refusals spent nothing
    assert log.claim("run-1", "fox", bound, now=NOON + timedelta(minutes=2)) == 1  # a flow retry
    assert log.claim("run-5", "owl", bound, now=NOON + timedelta(minutes=3)) == 2


def test_two_crashed_runs_of_one_name_are_told_apart_by_their_ids(tmp_path):
    """Prefect's run names are not unique: the restart of one 'fox' must not refuse the
    restart of another 'fox'; the same id claimed by another run still is."""
    log = RestartLog(tmp_path / "runs" / "restarts.json")
    bound = RestartBound(limit=3)
    assert log.claim("run-1", "fox", bound, now=NOON, continues_id="id-1") == 1
    assert log.claim("run-2", "fox", bound, now=NOON, continues_id="id-2") == 2
    with pytest.raises(RestartRefusedError, match="already restarted by run 'run-1'"):
        log.claim("run-3", "fox", bound, now=NOON, continues_id="id-1")
    assert [(r.continues, r.continues_id) for r in log.restarts()] == [
        ("fox", "id-1"),
        ("fox", "id-2"),
    ]
