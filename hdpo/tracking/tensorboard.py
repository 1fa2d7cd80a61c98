"""TensorBoard: scalars into event files under <work dir>/tensorboard (`tensorboard --logdir results/checkpoints`);
at the end the summary and tables as markdown text and the figures as images."""
from __future__ import annotations

from hdpo.tracking import RunInfo


class TensorBoardBackend:
    durable = True  # each row is flushed to its event file

    def __init__(self, info: RunInfo, state: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch ships the writer; it needs the tensorboard package
            raise ImportError("the `tensorboard` package is not installed") from None
        self.writer = SummaryWriter(log_dir=str(info.work_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_end(self, summary: dict[str, float], tables: dict[str, list[dict]], figures: dict, step: int) -> None:
        self.writer.add_text("summary", _markdown([{"key": k, "value": v} for k, v in summary.items()]), step)
        for name, rows in tables.items():
            self.writer.add_text(name, _markdown(rows), step)
        for name, fig in figures.items():
            self.writer.add_figure(name, fig, step, close=False)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _markdown(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
