"""MLflow: one MLflow run per training run in the experiment tracking.project, named after it, tagged with run,
method and seed, the resolved config as parameters (dotted keys). Its run id is kept in trackers.json, so a
resumed run reopens it. The store is tracking.mlflow_tracking_uri (null: MLFLOW_TRACKING_URI, else MLflow's
default). MLflow's metric names allow no '@': pass@k is logged as pass_at_k; and as its file store keeps a metric
in a file named by its path, a key that also groups others ('cliffs' beside 'cliffs/distilled') is logged with
'/total' appended."""
from __future__ import annotations

import json
import time

from hdpo.tracking import RunInfo, flatten

MAX_BATCH = 100  # MLflow's limit of parameters per log_batch request


def metric_names(keys) -> dict[str, str]:
    """{key: MLflow's name for it} for the keys of one row."""
    groups = {k.rsplit("/", i)[0] for k in keys for i in range(1, k.count("/") + 1)}
    return {k: (f"{k}/total" if k in groups else k).replace("@", "_at_") for k in keys}


class MlflowBackend:
    durable = True  # each log_batch is a write to the store

    def __init__(self, info: RunInfo, settings, state: dict):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("the `mlflow` package is not installed") from None
        self.Metric = Metric
        self.client = MlflowClient(settings.mlflow_tracking_uri)
        run_id = state.get("run_id")
        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:  # a new run (or the store named in trackers.json is gone): its rows start again
            state.pop("logged", None)
            experiment = self.client.get_experiment_by_name(settings.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(settings.project))
            run_id = self.client.create_run(experiment_id, run_name=info.name, tags={
                "run": info.name, "method": info.method, "seed": str(info.seed)}).info.run_id
            params = [Param(k, v if isinstance(v, str) else json.dumps(v))
                      for k, v in flatten(info.config, ".").items()]
            for i in range(0, len(params), MAX_BATCH):
                self.client.log_batch(run_id, params=params[i:i + MAX_BATCH])
            state["run_id"] = run_id
        self.run_id = run_id

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST, by store
            return False

    def log(self, values: dict[str, float], step: int) -> None:
        now, names = int(time.time() * 1000), metric_names(values)
        self.client.log_batch(self.run_id, metrics=[self.Metric(names[k], v, now, step) for k, v in values.items()])

    def log_end(self, summary: dict[str, float], tables: dict[str, list[dict]], figures: dict, step: int) -> None:
        self.log({f"summary/{k}": v for k, v in summary.items()}, step)
        for name, rows in tables.items():
            if rows:
                self.client.log_table(self.run_id, {c: [r.get(c) for r in rows] for c in rows[0]}, f"{name}.json")
        for name, fig in figures.items():
            self.client.log_figure(self.run_id, fig, f"{name}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
