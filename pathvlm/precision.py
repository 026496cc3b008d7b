"""One numeric precision setting for every stage: `resolve_precision("auto"|"fp32"|"bf16"|"fp16")`.

``auto`` is decided once per process from the hardware (and logged): bf16 where the device runs
it fast (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16), else fp16 on CUDA, else fp32.
``PATHVLM_PRECISION`` overrides what ``auto`` (or no choice) means; an explicit choice wins.
`cast_module` puts a module's weights in bf16/fp16 for inference while its unsafe layers stay fp32.
`resolve_for` is `resolve_precision` for one model: ``auto`` keeps fp32 for a model whose
reduced-precision outputs were measured unequal to fp32 (an explicit choice still gets it).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvlm.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENV_VAR = "PATHVLM_PRECISION"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags with native bf16 arithmetic; without them torch emulates bf16 and it is slower than fp32
FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# layers whose statistics (means, variances) lose too much in 8 mantissa bits: kept in fp32
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); tests patch this to say no."""
    return any(flag in cpu_flags() for flag in FAST_BF16_CPU_FLAGS)


def _parse_device(device: str | torch.device | None) -> torch.device:
    """The device named (None or "": CUDA when available, else the CPU); it need not be present."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r}: not a device (use cpu, cuda or cuda:N)") from exc


def default_device(device: str | torch.device | None = None) -> torch.device:
    """The device given (``cpu``, ``cuda``, ``cuda:1``), or CUDA when available, else the CPU."""
    resolved = _parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no CUDA GPU (use cpu)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: pathvlm runs on cpu or cuda")
    return resolved


def _device_type(device: str | torch.device | None) -> str:
    # the kind of device a precision is for; it need not be present (rules are checked anywhere)
    return _parse_device(device).type


@functools.cache
def _auto(device_type: str) -> str:
    """What ``auto`` means on this kind of device; computed and logged once per process."""
    if device_type == "cuda":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        why = "CUDA device " + ("with" if choice == "bf16" else "without") + " bf16 support"
    elif device_type == "cpu" and cpu_has_fast_bf16():
        choice, why = "bf16", "CPU with native bf16 (" + "/".join(FAST_BF16_CPU_FLAGS) + ")"
    else:
        choice, why = "fp32", f"{device_type} without fast bf16"
    log.info("precision auto -> %s (%s; override with %s)", choice, why, ENV_VAR)
    return choice


def resolve_precision(choice: str | None = "auto", device: str | torch.device | None = None) -> str:
    """``"auto"|"fp32"|"bf16"|"fp16"`` (or None) -> the concrete precision for ``device``.

    None and ``auto`` take ``PATHVLM_PRECISION`` when it is set, else the hardware's choice.
    fp16 needs CUDA (CPUs have no fast fp16 path); bf16 on a CPU without native support works,
    slowly, and says so.
    """
    choice = requested(choice)
    device_type = _device_type(device)
    if choice == "auto":
        return _auto(device_type)
    if choice == "fp16" and device_type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if choice == "bf16" and device_type == "cpu" and not cpu_has_fast_bf16():
        log.warning("precision bf16 on a CPU without native bf16: correct but slower than fp32")
    return choice


def requested(choice: str | None) -> str:
    """What was asked for: the argument, or ``PATHVLM_PRECISION`` in place of None/``auto``
    (still ``auto`` when neither names a precision); validated."""
    choice = (choice or "auto").lower()
    if choice == "auto":
        choice = (os.environ.get(ENV_VAR) or "auto").lower()
        if choice not in PRECISIONS:
            raise ConfigError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(PRECISIONS)}")
    elif choice not in PRECISIONS:
        raise ConfigError(f"precision {choice!r}: expected one of {', '.join(PRECISIONS)}")
    return choice


def resolve_for(choice: str | None, device: str | torch.device | None, reduced_ok: bool = True,
                what: str = "model", why: str = "") -> str:
    """`resolve_precision` for one model. When ``auto`` picks bf16/fp16 but the model's
    reduced-precision outputs were measured unequal to fp32 (``reduced_ok`` False, ``why`` says
    how), ``auto`` keeps fp32 and logs it; an explicit ``bf16``/``fp16`` (argument or
    ``PATHVLM_PRECISION``) is still honoured, with a warning naming the measured difference."""
    precision = resolve_precision(choice, device)
    if precision == "fp32" or reduced_ok:
        return precision
    if requested(choice) != "auto":  # named by the user (argument or PATHVLM_PRECISION)
        _say_once(logging.WARNING, f"{what} in {precision} as asked; its {precision} outputs are not "
                  f"equal to fp32: {why}")
        return precision
    _say_once(logging.INFO, f"precision auto -> fp32 for {what} ({why}; pass --precision {precision} "
              "to trade that for speed)")
    return "fp32"


_SAID: set[str] = set()


def _say_once(level: int, message: str) -> None:
    """Log a per-model precision decision once per process (resume checks and every
    ``set_precision`` call make the same decision again)."""
    if message not in _SAID:
        _SAID.add(message)
        log.log(level, message)


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a concrete precision (``fp32``, ``bf16``, ``fp16``)."""
    if precision not in DTYPES:
        raise ConfigError(f"precision {precision!r} is not concrete; resolve it first")
    return DTYPES[precision]


def _to_fp32_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _back_to(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return output.to(dtype) if torch.is_tensor(output) and output.is_floating_point() else output

    return hook


def cast_module(module: nn.Module, precision: str, keep_fp32: tuple[str, ...] = (),
                fp32_norms: bool = True, cast_buffers: bool = True) -> nn.Module:
    """Cast ``module``'s weights to ``precision`` for inference, in place; returns it.

    Autocast alone leaves open_clip's ``nn.MultiheadAttention`` towers mostly in fp32 (its fused
    path is not an autocast op) and gains ~1.2x on CPU; casting the weights runs the whole tower
    in bf16 (~3x). What stays fp32, and why:
      * with ``fp32_norms``, norm layers (LayerNorm, GroupNorm, BatchNorm): a mean and variance
        over hundreds of channels in 8 mantissa bits shifts every activation; each keeps fp32
        weights and fp32 statistics (CPU kernels do this natively for a bf16 input; on other
        devices hooks feed it fp32 and cast its output back). An HF LLM passes False: its
        RMSNorm already computes the variance in fp32 itself;
      * parameters named in ``keep_fp32`` (e.g. CLIP's ``logit_scale``: exp() of it amplifies
        rounding error). Floating buffers outside norms (attention masks, position tables) are
        cast with ``cast_buffers`` so they do not promote activations back to fp32; an HF LLM
        passes False (its rotary frequencies are computed in fp32 by design).
    Callers keep the final L2 normalisation in fp32. The fp32 tensors are kept (the cast ones
    are new), so ``precision="fp32"`` restores the exact original weights; cost: the reduced
    copy, half the fp32 size.
    """
    for handle in getattr(module, "_pathvlm_precision_hooks", []):
        handle.remove()
    module._pathvlm_precision_hooks = []
    master = getattr(module, "_pathvlm_fp32", None)
    if master is not None:  # undo an earlier cast first: exact fp32 weights again
        for sub, name, kind, tensor in master:
            if kind == "param":
                getattr(sub, name).data = tensor
            else:
                setattr(sub, name, tensor)
        module._pathvlm_fp32 = None
    dtype = dtype_of(precision)
    if dtype == torch.float32:
        return module
    master = []
    for sub in module.modules():
        if fp32_norms and isinstance(sub, NORM_TYPES):
            # CPU norm kernels take a reduced-precision input with fp32 weights and accumulate
            # in fp32 (mixed-dtype layer/batch/group norm); elsewhere hooks do it by hand
            own = next(sub.parameters(recurse=False), None)
            if own is not None and own.device.type != "cpu":
                module._pathvlm_precision_hooks += [sub.register_forward_pre_hook(_to_fp32_input),
                                                     sub.register_forward_hook(_back_to(dtype))]
            continue
        for name, param in sub.named_parameters(recurse=False):
            if param.is_floating_point() and name not in keep_fp32 and param.dtype != dtype:
                master.append((sub, name, "param", param.data))
                param.data = param.data.to(dtype)
        for name, buf in list(sub.named_buffers(recurse=False)) if cast_buffers else []:
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                master.append((sub, name, "buffer", buf))
                setattr(sub, name, buf.to(dtype))
    module._pathvlm_fp32 = master
    return module


def autocast(precision: str, device: str | torch.device | None = None):
    """``torch.autocast`` for a reduced precision on ``device``, or a no-op context for fp32."""
    from contextlib import nullcontext

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(_device_type(device), dtype=dtype_of(precision))


def accelerate_mixed_precision(choice: str | None, cpu: bool) -> str:
    """A ``train.mixed_precision`` value (auto/no/fp32/bf16/fp16) -> accelerate's (no/bf16/fp16).

    Master weights and optimizer state stay fp32; accelerate autocasts forward and loss.
    """
    choice = (choice or "auto").lower()
    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    resolved = resolve_precision("fp32" if choice == "no" else choice, device)
    return "no" if resolved == "fp32" else resolved
