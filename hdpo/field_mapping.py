"""How a dataset's raw rows map to a problem's fields, and the error a dataset raises.

A dataset's mapping is data (DatasetSpec's *_key / *_template / *_pattern keys), like NeMo-RL's input_key and
output_key. The built-in formats are presets of those keys; a key set in the config wins over its preset.
This module sits below both hdpo.config (which checks every dataset's mapping) and hdpo.data (which applies it).
"""
from __future__ import annotations

import re
from typing import Any


class DataError(ValueError):
    """A dataset cannot be found or a row cannot be mapped; the message says where."""


MAPPING_KEYS = ("id_key", "problem_key", "problem_template", "answer_key", "answer_pattern", "answer_remove",
                "solution_key", "solution_template", "solution_remove", "prompt_template", "system_prompt")
GENERIC = {"problem_key": "problem", "answer_key": "answer", "solution_key": "solution",
           "prompt_template": "{problem}"}
PRESETS: dict[str, dict] = {
    "openmathinstruct2": {"answer_key": "expected_answer", "solution_key": "generated_solution"},
    "math500": {"id_key": "unique_id"},
    "aime": {"id_key": "id"},  # AIME 2025 has no worked solutions; the Hub copies may lack an id
    # "<<16-3-4=9>>" are calculator annotations for the original tooling, not part of the worked solution.
    "gsm8k": {"id_key": "idx", "problem_key": "question", "answer_pattern": r"####\s*(.*?)\s*$",
              "answer_remove": ",", "solution_key": "answer", "solution_remove": r"<<[^<>]*>>"},
    "svamp": {"id_key": "ID", "problem_template": "{Body} {Question}", "answer_key": "Answer",
              "solution_template": "{Equation} = {Answer}"},
    # "9 (apples)" -> "9". Only a trailing parenthesis after whitespace is a unit, so "-(1/3)" stays whole.
    "asdiv": {"id_key": "idx", "problem_template": "{body} {question}",
              "answer_pattern": r"^(.+?)(?:\s+\([^()]*\))?$", "solution_key": "formula"},
    "mawps": {"id_key": "idx", "problem_key": "input", "answer_key": "target", "solution_key": None},
}


def mapping_of(spec: Any) -> dict:
    """The field mapping of a dataset (a hdpo.config.DatasetSpec): generic defaults, then its format's preset,
    then the keys it sets."""
    if spec.format is not None and spec.format not in PRESETS:
        raise DataError(f"format {spec.format!r}: unknown (known: {', '.join(sorted(PRESETS))}; or leave format "
                        "out and name the fields with problem_key, answer_key, ...)")
    out = {k: None for k in MAPPING_KEYS}
    out.update(GENERIC)
    out.update(PRESETS.get(spec.format, {}))
    out.update({k: getattr(spec, k) for k in MAPPING_KEYS if getattr(spec, k) is not None})
    for k in ("answer_pattern", "answer_remove", "solution_remove"):
        if out[k] is not None:
            try:
                out[k] = re.compile(out[k], re.DOTALL)
            except re.error as err:
                raise DataError(f"{k}: {out[k]!r} is not a regular expression ({err})") from None
    return out
