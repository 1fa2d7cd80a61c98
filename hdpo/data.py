"""Problems: where they come from, how they are split, and how they become prompts.

A dataset is a `DatasetSpec` (hdpo.config): a local file (`path`, or `file` inside $HDPO_DATA_DIR) or a Hugging
Face Hub dataset. Each source has a *format*, a function mapping one raw row to the fields of a `Problem`.
Bad rows fail loudly with the file, the 1-based row number and the field; nothing is skipped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from hdpo.config import Config, DatasetSpec
from hdpo.synthetic import GENERATORS, generate
from hdpo.field_mapping import PRESETS, DataError, mapping_of
from hdpo.io import write_json, write_jsonl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str  # the user message (the dataset's prompt_template applied)
    solution: Optional[str]
    answer: Any  # a string, or a list of accepted answers (any one scores 1)
    source: str
    system_prompt: Optional[str] = None  # the dataset's own; None: data.system_prompt

    @property
    def first_answer(self) -> str:
        return self.answer[0] if isinstance(self.answer, list) else self.answer

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["system_prompt"] is None:
            del d["system_prompt"]
        return d

    @staticmethod
    def from_dict(d: dict) -> "Problem":
        return Problem(id=str(d["id"]), problem=d["problem"], solution=d.get("solution"),
                       answer=d["answer"], source=d["source"], system_prompt=d.get("system_prompt"))


# --- field mapping: one raw row -> {id?, problem, solution, answer} -------------------------------------------
# The mapping's keys, presets and mapping_of live in hdpo/field_mapping.py (hdpo.config checks them too).


def _field(row: dict, key: str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(f"field {key!r}: missing (row has {sorted(row)})")
    return row[key]


def _answer_str(value: Any, key: str) -> str:
    """Answers are strings: 145.0 -> '145', 2.5 -> '2.5', ' 70 ' -> '70'."""
    if isinstance(value, bool):
        raise DataError(f"field {key!r}: {value!r} is not an answer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"field {key!r}: {value!r} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    raise DataError(f"field {key!r}: expected a number or a string, got {type(value).__name__}")


def check_fields(problem: Any, answer: Any) -> None:
    """A problem and each of its answers must be non-empty text (an answer of only punctuation, such as '???',
    is left to the reward, which scores it 0 and counts it as gold_unparseable: one odd row of a million must
    not stop the split)."""
    for key, values in (("problem", [problem]),
                        ("answer", answer if isinstance(answer, list) and answer else [answer])):
        for value in values:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"field {key!r}: empty or not text ({value!r})")


def _optional_text(row: dict, key: Optional[str]) -> Optional[str]:
    value = row.get(key) if key else None
    if not isinstance(value, str):
        return None
    return value.strip() or None


class _RowFields(dict):
    """str.format_map over a row: numbers as answers are written, strings stripped, a missing field raises."""

    def __init__(self, row: dict, optional: bool):
        super().__init__()
        self.row, self.optional = row, optional

    def __missing__(self, key: str) -> str:
        if self.row.get(key) is None or self.row.get(key) == "":
            if self.optional:
                raise KeyError(key)
            _field(self.row, key)
        value = self.row[key]
        return value.strip() if isinstance(value, str) else _answer_str(value, key)


def _fill(template: str, row: dict, optional: bool = False) -> Optional[str]:
    try:
        return template.format_map(_RowFields(row, optional))
    except KeyError:  # an optional field is missing: no text
        return None
    except (ValueError, IndexError) as err:
        raise DataError(f"template {template!r}: {err}") from None


def _one_answer(value: Any, key: str, m: dict) -> str:
    text = _answer_str(value, key)
    if m["answer_pattern"] is not None:
        found = m["answer_pattern"].search(text)
        if not found or not found.groups():
            raise DataError(f"field {key!r}: no match of answer_pattern {m['answer_pattern'].pattern!r} in "
                            f"{text[-80:]!r}")
        text = found.group(1)
    if m["answer_remove"] is not None:
        text = m["answer_remove"].sub("", text)
    return text.strip()


def map_row(row: dict, m: dict) -> dict:
    """One raw row -> {id, problem, solution, answer} under mapping `m` (see mapping_of). The answer is a string,
    or a list of accepted answers when the field holds a list."""
    if m["problem_template"]:
        problem = _fill(m["problem_template"], row)
    else:
        problem = _field(row, m["problem_key"])
    akey = m["answer_key"]
    raw = _field(row, akey)
    if isinstance(raw, list):
        if not raw:
            raise DataError(f"field {akey!r}: an empty list of answers")
        answers = [_one_answer(a, akey, m) for a in raw]
        answer: Any = answers[0] if len(set(answers)) == 1 else answers
    else:
        answer = _one_answer(raw, akey, m)
    if m["solution_template"]:
        solution = _fill(m["solution_template"], row, optional=True)
    elif m["solution_key"] == akey and m["answer_pattern"] is not None and isinstance(raw, str):
        solution = raw[:m["answer_pattern"].search(raw).start()]  # the worked solution before the final answer
    else:
        solution = _optional_text(row, m["solution_key"])
    if solution is not None and m["solution_remove"] is not None:
        solution = m["solution_remove"].sub("", solution)
    solution = solution.strip() or None if isinstance(solution, str) else None
    out = {"problem": problem, "solution": solution, "answer": answer}
    if m["id_key"] and row.get(m["id_key"]) is not None:
        out["id"] = row[m["id_key"]]
    return out


# The built-in formats as row mappers (the presets applied to a spec that sets nothing else).
FORMATS: dict[str, Callable[[dict], dict]] = {
    name: (lambda row, _m=None, _name=name: map_row(row, mapping_of(DatasetSpec(format=_name)))) for name in PRESETS}


# --- loading ------------------------------------------------------------------------------------------------

def _read_local(path: Path) -> list[tuple[int, dict]]:
    """(1-based row number, row) pairs; for JSON lines the row number is the line number."""
    name = path.name.lower()
    if name.endswith((".parquet", ".csv")):
        import datasets  # heavy import, only where needed
        builder = "parquet" if name.endswith(".parquet") else "csv"
        from datasets.utils import logging as ds_logging

        # datasets logs a parser error itself (and draws a bar): our one line below says it instead
        verbosity, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
        ds_logging.set_verbosity(ds_logging.CRITICAL)
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets wraps the parser's error; its root cause names what is wrong
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            raise DataError(f"{path}: cannot be read as {builder} ({type(cause).__name__}: {first})") from None
        finally:
            ds_logging.set_verbosity(verbosity)
            if bars:
                datasets.enable_progress_bars()
        return list(enumerate(ds.to_list(), 1))
    if not name.endswith((".jsonl", ".json")):
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .csv)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: row {line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
                        ) from None
    if name.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        pairs = list(enumerate(rows, 1))
    else:  # JSON lines (also what `datasets` writes for .json)
        pairs = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    pairs.append((i, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: row {i}: not valid JSON ({err.msg})") from None
    for i, row in pairs:
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
    return pairs


def _resolve(spec: DatasetSpec, data_dir: Optional[str]) -> Optional[Path]:
    if spec.path:
        path = Path(spec.path)
        if not path.is_file():
            raise DataError(f"path {spec.path!r}: no such file")
        return path
    data_dir = data_dir or os.environ.get("HDPO_DATA_DIR")
    if spec.file and data_dir and (Path(data_dir) / spec.file).is_file():
        return Path(data_dir) / spec.file
    return None


def _where_file_was_looked_for(spec: DatasetSpec, data_dir: Optional[str]) -> str:
    """Why `spec.file` was not found locally, naming the folder and where it came from."""
    if data_dir:
        where = f"--data-dir {data_dir}"
    elif os.environ.get("HDPO_DATA_DIR"):
        data_dir, where = os.environ["HDPO_DATA_DIR"], f"HDPO_DATA_DIR={os.environ['HDPO_DATA_DIR']}"
    else:
        return f"{spec.file}: HDPO_DATA_DIR is not set (the folder of local mirrors)"
    if not Path(data_dir).is_dir():
        return f"{spec.file}: {where} is not a folder"
    return f"{spec.file}: not in {where}"


def _check_hub(hub_id: str, timeout_s: float = 3.0) -> None:
    """Fail at once, not after minutes of retries, when the Hub cannot be reached. Skipped in offline mode,
    where `datasets` reads its local cache."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENDPOINT

    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"{hub_id}: the Hugging Face Hub ({ENDPOINT}) is not reachable ({err}); "
                              f"with a local cache set HF_HUB_OFFLINE=1") from None


def _load(spec: DatasetSpec, data_dir: Optional[str]) -> tuple[list[tuple[int, dict]], str]:
    path = None if spec.generator else _resolve(spec, data_dir)
    if spec.generator:
        if spec.limit is None:
            raise DataError(f"generator {spec.generator!r}: needs `limit` (how many problems)")
        try:
            rows = generate(spec.generator, spec.limit, spec.generator_seed)
        except KeyError:
            raise DataError(f"generator {spec.generator!r}: unknown (known: {', '.join(sorted(GENERATORS))})") \
                from None
        pairs = list(enumerate(rows, 1))
        origin = f"generated:{spec.generator}(n={spec.limit}, seed={spec.generator_seed})"
    elif path is not None:
        pairs, origin = _read_local(path), str(path)
    else:
        if not spec.hub_id:
            if spec.file:
                raise DataError(f"{_where_file_was_looked_for(spec, data_dir)}, and the dataset has no hub_id")
            raise DataError("a dataset needs `path`, `file` (in $HDPO_DATA_DIR) or `hub_id`")
        try:
            _check_hub(spec.hub_id)
        except ConnectionError as err:
            if spec.file:  # a local mirror was meant: say where it was looked for, not "use the demo"
                raise DataError(f"{_where_file_was_looked_for(spec, data_dir)}, and {err}") from None
            raise
        import datasets
        origin = f"hub:{spec.hub_id}" + (f":{spec.subset}" if spec.subset else "") + f"/{spec.split}"
        logger.info("loading %s from the Hugging Face Hub", origin)
        ds = datasets.load_dataset(spec.hub_id, spec.subset, split=spec.split)
        if spec.limit is not None:  # convert only the rows we keep (OpenMathInstruct-2 has 1M)
            ds = ds.select(range(min(spec.limit, len(ds))))
        pairs = list(enumerate(ds.to_list(), 1))
    if spec.limit is not None:
        pairs = pairs[:spec.limit]
    return pairs, origin


def load_rows(spec: DatasetSpec, data_dir: Optional[str] = None) -> tuple[list[dict], str]:
    """Raw rows (the first spec.limit if set) and their origin: a file path or 'hub:<id>/<split>'.

    Source order: spec.path; else spec.file inside `data_dir` (default $HDPO_DATA_DIR) if present; else the Hub.
    """
    pairs, origin = _load(spec, data_dir)
    return [row for _, row in pairs], origin


def load_problems(spec: DatasetSpec, data_dir: Optional[str] = None, name: Optional[str] = None) -> list[Problem]:
    """Every row of the source (the first spec.limit) through its field mapping; a bad row raises DataError."""
    return _load_problems(spec, data_dir, name)[0]


def _load_problems(spec: DatasetSpec, data_dir: Optional[str], name: Optional[str] = None
                   ) -> tuple[list[Problem], str]:
    """`name` (a benchmark's, say) prefixes ids and names the source when the spec has no format."""
    m = mapping_of(spec)
    source = spec.format or name or "data"
    named = f" (dataset {name!r})" if name else ""
    try:
        pairs, origin = _load(spec, data_dir)
    except DataError as err:
        raise DataError(f"{err}{named}") from None
    if not pairs:  # an empty benchmark would score NaN; an empty training source, nothing
        raise DataError(f"{origin}: no rows{named}")
    problems = []
    for index, (rownum, row) in enumerate(pairs):
        try:
            mapped = map_row(row, m)
            check_fields(mapped["problem"], mapped["answer"])
        except DataError as err:
            raise DataError(f"{origin}: row {rownum}: {err}") from None
        local_id = mapped.get("id")
        problems.append(Problem(
            id=f"{source}:{index if local_id is None else local_id}",
            problem=m["prompt_template"].replace("{problem}", mapped["problem"].strip()),
            solution=mapped.get("solution"), answer=mapped["answer"], source=source,
            system_prompt=m["system_prompt"]))
    logger.info("loaded %d %s problems from %s", len(problems), source, origin)
    return problems, origin


# --- the train/validation split ---------------------------------------------------------------------------------

def split_train_val(problems: list[Problem], val_fraction: float, seed: int,
                    max_val: Optional[int]) -> tuple[list[Problem], list[Problem]]:
    """The paper's 95/5 split, index for index.

    The paper ran NeMo-RL, whose OpenMathInstruct-2 loader calls `datasets.Dataset.train_test_split(test_size,
    seed)`; this reproduces that call exactly without needing a `Dataset`: permute the indices with
    `np.random.default_rng(seed)`, the first ceil(val_fraction * n) go to validation (in permutation order),
    the rest to train. NeMo-RL validates on the first `max_val_samples` of that (unshuffled) validation set, so
    validation is then cut to its first `max_val` problems; the excess is dropped, NOT moved to train.
    Deterministic for a seed; train and validation are disjoint by index (not by text: duplicated problems in
    the pool, as in OpenMathInstruct-2, can land on both sides, as in the paper).
    """
    n = len(problems)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = math.ceil(val_fraction * n)
    if n - n_val < 1:
        raise DataError(f"{n} problems with val_fraction={val_fraction} leave no training problems")
    perm = np.random.default_rng(seed).permutation(n)
    val = [problems[i] for i in perm[:n_val]]
    train = [problems[i] for i in perm[n_val:]]
    if max_val is not None:
        val = val[:max_val]
    return train, val


# --- prompts ------------------------------------------------------------------------------------------------------

# The teacher sees the ground truth as a hint but must still write its own solution, in the student's style:
# its tokens become distillation targets for a student that never sees the hint.
PRIVILEGED_SOLUTION_LABEL = "Reference solution"
PRIVILEGED_ANSWER_LABEL = "Reference final answer"
PRIVILEGED_TEMPLATE = (
    "{problem}\n\n"
    "[Privileged information: {label}]\n"
    "{info}\n"
    "[End of privileged information]\n\n"
    "Use the reference above only as a hint. Solve the problem yourself: reason step by step, write a complete "
    "solution that does not mention the reference, and put your final answer within \\boxed{{}}."
)


def build_messages(p: Problem, system_prompt: str, privileged: Optional[str] = None) -> list[dict]:
    """Chat messages for the student (privileged=None) or the teacher ('solution' or 'answer')."""
    if privileged is None:
        user = p.problem
    elif privileged == "solution" and p.solution:
        user = PRIVILEGED_TEMPLATE.format(problem=p.problem, label=PRIVILEGED_SOLUTION_LABEL, info=p.solution)
    elif privileged in ("solution", "answer"):  # no reference solution: the answer is what we have
        user = PRIVILEGED_TEMPLATE.format(problem=p.problem, label=PRIVILEGED_ANSWER_LABEL, info=p.first_answer)
    else:
        raise ValueError(f"privileged must be None, 'solution' or 'answer', got {privileged!r}")
    return [{"role": "system", "content": p.system_prompt or system_prompt}, {"role": "user", "content": user}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- the prepare_data step ----------------------------------------------------------------------------------------

def _split_pool(d, data_dir: Optional[str], outputs: dict) -> dict:
    """The training pool, split 95/5 into outputs['train.jsonl'] and outputs['val.jsonl']; its summary."""
    pool, sources = [], []
    for i, spec in enumerate(d.train):
        problems, origin = _load_problems(spec, data_dir, f"train{i}")
        sources.append({"format": spec.format, "origin": origin, "count": len(problems)})
        pool.extend(problems)
    if d.max_train_problems is not None and len(pool) > d.max_train_problems:
        logger.info("capping the training pool at %d of %d problems", d.max_train_problems, len(pool))
        pool = pool[:d.max_train_problems]
    _warn_duplicate_ids(pool, "training pool")
    train, val = split_train_val(pool, d.val_fraction, d.split_seed, d.max_val_problems)
    dropped = len(pool) - len(train) - len(val)
    logger.info("split %d problems: %d train, %d validation (seed %d)", len(pool), len(train), len(val), d.split_seed)
    outputs["train.jsonl"], outputs["val.jsonl"] = train, val
    return {"train_sources": sources, "pool": len(pool),
            "split": {"val_fraction": d.val_fraction, "seed": d.split_seed, "max_val_problems": d.max_val_problems,
                      "val_dropped_by_cap": dropped}}


def prepare_data(cfg: Config, out_dir: str | Path, data_dir: Optional[str] = None, splits: bool = True,
                 benchmarks: Optional[list[str]] = None) -> dict:
    """Write train.jsonl, val.jsonl and summary.json (`splits`) and benchmarks/<name>.jsonl for each of
    `benchmarks` (None: every one in experiment.benchmarks) under out_dir; return the summary.

    The workflow asks for one part per job (the splits, or one benchmark), so a benchmark's settings rewrite
    only its own file and training never sees a rewritten split it did not ask for."""
    out_dir = Path(out_dir)
    outputs: dict[str, list[Problem]] = {}
    summary: dict = {}
    if splits:
        summary = _split_pool(cfg.data, data_dir, outputs)
    names = list(cfg.experiment.benchmarks) if benchmarks is None else list(benchmarks)
    unknown = [n for n in names if n not in cfg.benchmarks]
    if unknown:
        raise DataError(f"benchmark {unknown[0]!r}: not under benchmarks: in the config "
                        f"(known: {', '.join(sorted(cfg.benchmarks))})")
    summary["benchmarks"] = {}
    for name in names:  # every source read before anything is written
        spec = cfg.benchmarks[name]
        problems, origin = _load_problems(spec, data_dir, name)
        outputs[f"benchmarks/{name}.jsonl"] = problems
        summary["benchmarks"][name] = {"format": spec.format, "origin": origin, "count": len(problems)}
    files = {name: len(problems) for name, problems in outputs.items()}
    summary = {"files": files, **summary}
    written = [*outputs, "summary.json"] if splits else list(outputs)
    # Staged beside the outputs, then moved in by renames: a full disk leaves the earlier files as they were,
    # never a train.jsonl of one split beside a summary of another.
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".prepare-data.", dir=out_dir))
    try:
        for name, problems in outputs.items():
            write_jsonl(stage / name, (p.to_dict() for p in problems))
        if splits:
            write_json(stage / "summary.json", summary)
        for name in written:
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    logger.info("wrote %s", ", ".join(f"{k} ({v})" for k, v in files.items()))
    return summary


def _warn_duplicate_ids(problems: list[Problem], what: str) -> None:
    seen: set[str] = set()
    dups = []
    for p in problems:
        if p.id in seen:
            dups.append(p.id)
        seen.add(p.id)
    if dups:  # harmless for training, but per-problem records keyed by id would merge
        logger.warning("%s: %d duplicate problem ids (e.g. %s): two sources share a format and ids", what,
                       len(dups), dups[0])


def read_problems(path: str | Path) -> list[Problem]:
    """Problems from a file written by prepare_data."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file (give --data the folder written by prepare-data)")
    problems = []
    for rownum, row in _read_local(Path(path)):
        try:
            p = Problem.from_dict(row)
            check_fields(p.problem, p.answer)
        except KeyError as err:
            raise DataError(f"{path}: row {rownum}: field {err.args[0]!r}: missing") from None
        except DataError as err:
            raise DataError(f"{path}: row {rownum}: {err}") from None
        problems.append(p)
    if not problems:  # pass@k of no problems is NaN, not a result
        raise DataError(f"{path}: no problems")
    return problems
