"""Device, precision and compile choices: one place for the loop, bench, sample and eval.

Every caller (the loop, bench, sample, eval) takes its dtype, autocast and compile
rule from these functions, so that, for one, a benchmark never counts emulated bf16
as bf16 while training runs it as fp32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from raygpt.config.choices import DTYPES, TRI_STATE
from raygpt.errors import UserError


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N` (or a torch.device).

    A CUDA device always comes back with its index (`cuda` is the current device):
    torch.cuda.set_device and DDP's device_ids refuse a device without one. Every
    caller (loop, bench, sample, eval's scorers) gets its device here, so the rule is
    in one place.
    """
    if isinstance(name, torch.device):
        device = name
    else:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA but no GPU is available; use cpu")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if device.index >= count:
        raise UserError(
            f"--device {name}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}"
        )
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively (Ampere and later), not emulated."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


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
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.float32


def newton_schulz_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """Muon's Newton-Schulz precision on `device` for a run of `dtype` (one of DTYPES).

    bfloat16 where the run computes in bf16 (resolve_dtype) on a GPU that does it
    natively, as Muon was tuned; float32 otherwise: CPUs run bf16 matmuls slowly or
    emulated, pre-Ampere GPUs emulate them, and an fp32 run gets fp32 throughout.

    Never float16: the update is cast before it is normalised, and its entries lose
    precision below fp16's smallest normal (6e-5) and flush to zero below 6e-8. With
    entries around 1e-7, common in a large model's gradients, the fp16 result is about
    20% off the fp32 one, and at 1e-8 it is noise; bf16, with fp32's exponent range,
    stays about 1% off at any scale (tests/unit/runtime/test_cuda_path.py measures both).
    """
    if native_bf16(device) and resolve_dtype(dtype, device) == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def use_compile(setting: str, device: torch.device) -> bool:
    """`auto` compiles on CUDA only: on CPU inductor's compile time outweighs its gain
    for the small models people train there."""
    if setting not in TRI_STATE:
        raise UserError(f"unknown compile setting {setting!r}; use auto, true or false")
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def limit_gpu_memory(share: float) -> torch.device | None:
    """Cap this process's allocations on its GPU at `share` of it (a packed sweep trial's
    --gpus-per-trial below 1); returns the device capped, None when there is nothing to cap.

    Ray divides GPUs as a count and enforces no memory: without the cap, a trial that
    outgrows its share takes memory its neighbours on the GPU then fail without. With
    it, that trial alone gets the out-of-memory error.
    """
    if not 0 < share < 1 or not torch.cuda.is_available():
        return None
    device = resolve_device("cuda")
    torch.cuda.set_per_process_memory_fraction(share, device)
    return device


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def restore_grad_scaler(scaler: torch.amp.GradScaler, saved: dict | None) -> None:
    """A checkpoint's GradScaler state back into `scaler`, where there is one to restore.

    A disabled scaler (bfloat16, float32) saves an empty state, which torch refuses to
    load into an enabled one; an enabled scaler then starts from its initial scale. (A
    resume refuses another dtype before this, so that is a guard, not a path.) A
    disabled scaler has nothing to restore.
    """
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


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

    def __post_init__(self) -> None:
        # Indexed, whoever built it (resolve_device): configure() and DDP need the index.
        object.__setattr__(self, "device", resolve_device(self.device))

    @classmethod
    def create(cls, device: torch.device, dtype: str = "auto", compile: str = "auto") -> Runtime:
        """The runtime of one training attempt (or one scorer), configured.

        A compiling runtime starts from a fresh compiler: this process may have
        compiled other models before (a sweep reuses a trial's process for the next
        trial; tests and notebooks run several in-process runs), and dynamo keeps at
        most `recompile_limit` (8) graphs per function, past which it silently runs
        the function eager. Four configs of train + eval graphs fill it.
        """
        device = resolve_device(device)
        runtime = cls(device, resolve_dtype(dtype, device), use_compile(compile, device))
        if runtime.compile:
            torch._dynamo.reset()
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
