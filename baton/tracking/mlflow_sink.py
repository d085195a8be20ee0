"""The MLflow sink: one MLflow run per lineage of an experiment, continued by every flow
run of that lineage (a resume, a retry, an automatic restart).

The run is found by its tag ``baton.run_key`` (a digest of the experiment's folder and
the lineage), created with the first flow run's name when there is none. Steps stay
monotonic across kills: when the sink connects it reads the newest step MLflow holds
for each metric, and from then on sends a metric only at a step beyond it. A run killed
after sending step ``k`` and resumed from a checkpoint at ``s < k`` trains steps
``s+1..k`` again and produces the same values (exact resume, contract 5): MLflow keeps
the first ones, so no step appears twice, and none is missing, because the resumed run
trains every step after ``s`` again and the values the killed run recorded in
``metrics.jsonl`` up to ``s`` but never sent are sent first (``baton.tracking.tracker``).

This is the only module that imports ``mlflow``, and only when a sink is opened.
"""

import os
from typing import Any

from baton.tracking.items import FileCopy, Metric, Tag

# MLflow's limits: values per log_batch call, and the longest param value it stores.
MAX_BATCH_METRICS = 1000
MAX_BATCH_TAGS = 100
MAX_BATCH_PARAMS = 100
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
# One HTTP request's bound, and no retries inside MLflow's client: the sender retries
# (every retry_s) and must be able to give up within its close timeout.
HTTP_TIMEOUT_S = "10"
HTTP_RETRIES = "0"

RUN_KEY_TAG = "baton.run_key"


class MlflowSink:
    """Sends a run's values to MLflow (see the module docstring).

    Args:
        tracking_uri: The operator's MLflow tracking URI.
        experiment_name: The MLflow experiment runs are filed under.
        run_key: Identifies the lineage's run (tag ``baton.run_key``).
        run_name: The name of a new run (the flow run's).
        tags: Set when the sink connects (the flow run, experiment, lineage, config hash).
        params: The resolved config, flattened; a continued run keeps the values it has.
    """

    max_batch = MAX_BATCH_METRICS

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        *,
        run_key: str,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, str],
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_key = run_key
        self.run_name = run_name
        self.tags = tags
        self.params = params
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.continued = False
        self._client: Any = None
        self._latest: dict[str, int] = {}  # newest step MLflow holds, per metric

    @property
    def run_url(self) -> str | None:
        """The run's page in the MLflow UI (for an HTTP tracking server), once connected."""
        if self.run_id is None or not self.tracking_uri.startswith(("http://", "https://")):
            return None
        base = self.tracking_uri.rstrip("/")
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def open(self) -> None:
        """Find the lineage's run (or create it), its newest steps, and set the tags."""
        for name, value in (
            ("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S),
            ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES),
        ):
            os.environ.setdefault(name, value)
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment_name)
            except MlflowException:  # created meanwhile by another run
                experiment_id = client.get_experiment_by_name(self.experiment_name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            run = found[0]
            client.update_run(run.info.run_id, status="RUNNING")
            self._latest = {
                key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics
            }
            have = run.data.params
            self.continued = True
            self.run_name = run.info.run_name  # the lineage's first flow run's
        else:
            run = client.create_run(
                experiment_id, run_name=self.run_name, tags={RUN_KEY_TAG: self.run_key}
            )
            have = {}
        self._client, self.run_id, self.experiment_id = client, run.info.run_id, experiment_id
        # A continued run keeps the params it was created with (MLflow never changes a
        # param); keys that a resume may change (the horizon...) keep their first value.
        params = [
            Param(key, value[:MAX_PARAM_VALUE])
            for key, value in self.params.items()
            if key not in have
        ]
        for start in range(0, len(params), MAX_BATCH_PARAMS):
            client.log_batch(self.run_id, params=params[start : start + MAX_BATCH_PARAMS])
        self._send_tags([Tag(k, v) for k, v in self.tags.items()])

    def send(self, batch: list[Metric | Tag | FileCopy]) -> None:
        """Log ``batch``: metrics beyond the newest step of their key, tags, file copies."""
        from mlflow.entities import Metric as MlflowMetric

        metrics, latest = [], dict(self._latest)
        for item in batch:
            if isinstance(item, Metric) and item.step > latest.get(item.key, -1):
                latest[item.key] = item.step
                metrics.append(MlflowMetric(item.key, item.value, item.timestamp_ms, item.step))
        if metrics:  # one call: a batch holds at most max_batch items
            self._client.log_batch(self.run_id, metrics=metrics)
        self._latest = latest  # a retry of this batch after a later failure skips them
        self._send_tags([item for item in batch if isinstance(item, Tag)])
        for item in batch:
            if isinstance(item, FileCopy):
                self._client.log_artifact(self.run_id, item.path, item.folder)

    def close(self, finished: bool) -> None:
        """Mark the run FINISHED (the horizon reached) or KILLED (a run that stopped
        early; the next run of the lineage sets it RUNNING again)."""
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")

    def _send_tags(self, tags: list[Tag]) -> None:
        from mlflow.entities import RunTag

        entities = [RunTag(t.key, t.value[:MAX_TAG_VALUE]) for t in tags]
        for start in range(0, len(entities), MAX_BATCH_TAGS):
            self._client.log_batch(self.run_id, tags=entities[start : start + MAX_BATCH_TAGS])
