"""Device, precision and compile choices: one place for the loop, bench, sample and eval.

Each caller used to pick its own dtype, autocast and compile rule, and they had
drifted apart (bench counted emulated bf16 as bf16). These functions are the
only place those rules live.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from raygpt.config import DTYPES, TRI_STATE
from raygpt.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA but no GPU is available; use cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `name` (one of DTYPES) on `device`.

    auto: bf16 where the GPU does it natively, fp16 (with a GradScaler) on older
    GPUs, fp32 on CPU. `is_bf16_supported()` alone counts emulation, and emulated
    bf16 on a V100 or T4 is slower than fp16.
    """
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if name != "auto":
        dtype = getattr(torch, name)
        if device.type == "cpu" and dtype == torch.float16:
            raise UserError("float16 is not supported on CPU; use bfloat16 or float32")
        return dtype
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.float32


def use_compile(setting: str, device: torch.device) -> bool:
    """`auto` compiles on CUDA only: on CPU inductor's compile time outweighs its gain
    for the small models people train there."""
    if setting not in TRI_STATE:
        raise UserError(f"unknown compile setting {setting!r}; use auto, true or false")
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_threads_available() -> int:
    """Cores this process may run on (its affinity mask, which cgroup-limited containers
    narrow), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a model runs."""

    device: torch.device
    dtype: torch.dtype
    compile: bool

    @classmethod
    def create(cls, device: torch.device, dtype: str = "auto", compile: str = "auto") -> Runtime:
        runtime = cls(device, resolve_dtype(dtype, device), use_compile(compile, device))
        runtime.configure()
        return runtime

    def configure(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # TF32 matmuls: what nanoGPT and every GPT-2 speedrun use; fp32 accuracy
            # is not needed for the fp32 parts of a mixed-precision step.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled for fp16 only: bf16 has fp32's range and needs no loss scaling."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module) if self.compile else module

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{name}, {dtype_name(self.dtype)}{', compiled' if self.compile else ''}"
