"""Weights & Biases: one W&B run per training run, named after it, grouped by method, tagged with method and
seed, the resolved config as its config. Its id is kept in trackers.json, so a resumed run continues it
(`resume="allow"`). Offline (`WANDB_MODE=offline`, e.g. on a cluster without internet) the run is written under
<work dir>/wandb for `wandb sync` later. Project: tracking.project; entity: tracking.wandb_entity, else
WANDB_ENTITY, else your default."""
from __future__ import annotations

import uuid

from hdpo.tracking import RunInfo


class WandbBackend:
    durable = False  # rows are buffered for seconds; a killed process loses them

    def __init__(self, info: RunInfo, settings, state: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("the `wandb` package is not installed") from None
        self.wandb = wandb
        state.setdefault("run_id", uuid.uuid4().hex[:16])
        self.run = wandb.init(id=state["run_id"], resume="allow", project=settings.project,
                              entity=settings.wandb_entity, name=info.name, group=info.method, job_type="train",
                              tags=[info.method, f"seed{info.seed}"], config=info.config,
                              dir=str(info.work_dir))
        # resumed online, the server's next step: rows before it are there already (W&B would drop them)
        self.first_step = self.run.step

    def log(self, values: dict[str, float], step: int) -> None:
        if step >= self.first_step:
            self.run.log(values, step=step)

    def log_end(self, summary: dict[str, float], tables: dict[str, list[dict]], figures: dict, step: int) -> None:
        self.run.summary.update(summary)
        media = {name: self.wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
                 for name, rows in tables.items() if rows}
        media.update({name: self.wandb.Image(fig) for name, fig in figures.items()})
        self.run.log(media, step=step)

    def close(self) -> None:
        self.run.finish()
