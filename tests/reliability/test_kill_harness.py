"""The quick version of the random-kill harness (the full one: python -m tests.reliability.killer)."""

import pytest

from .killer import POINTS, reference_state, trial

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_state(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize(("seed", "point"), list(enumerate(p for p in POINTS if p != "time")))
def test_killed_at_a_point_resumes_bitwise_equal(seed, point, reference, tmp_path):
    result = trial(seed=seed, reference=reference, root=tmp_path, points=(point,))
    assert result.kills, "the child was never killed: the kill point did not occur"
    assert result.corrupt_committed == 0
    assert result.bitwise_equal
