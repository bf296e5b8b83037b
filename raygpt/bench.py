"""`python -m raygpt.bench [EXPERIMENT.toml] [--key value ...]`: training-step throughput.

nanoGPT's bench.py, in this process and without Ray: the model of a TrainConfig
(`model.init_from.build_model`, seeded like a run), batches from the configured dataset (or
random tokens with `--synthetic`), `--warmup-steps` untimed steps, then
`--bench-steps` timed ones, each a full optimizer step of one worker
(forward + backward over the gradient-accumulation micro-batches, clipping, the
optimizer update), timed as the training loop times them (step_stats.py): from
the previous step's end to its own, host work in between included, with no
synchronisation between steps. It prints the median step time, tokens/s and MFU
(against `metrics.PEAK_TFLOPS` or `--peak-tflops`; n/a on CPU without it). The
first step (compile, warm-up) is never timed, --warmup-steps 0 included.

`--compare` runs several variants in one process, each on a freshly seeded copy
of the same model over the same batches, and prints them side by side with the
speed-up over the first: fp32, bf16 autocast and bf16 autocast + torch.compile
on CUDA; fp32 eager and fp32 + torch.compile on CPU. A variant that fails to
compile is skipped with the reason. `--json PATH` also writes the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygpt.config.io import OneLineArgumentParser
from raygpt.config.train import TrainConfig, add_train_flags, load_train_config
from raygpt.data import prepare, sources
from raygpt.data import sampler as data_sampler
from raygpt.errors import UserError, exit_on_user_error, first_line
from raygpt.redact import redact_config
from raygpt.runtime import Runtime, dtype_name, resolve_device, resolve_dtype, use_compile
from raygpt.train import metrics
from raygpt.train.step import train_step
from raygpt.train.step_stats import StepStats

# TrainConfig keys that only matter to a Ray run (or to the lr schedule, which does not
# change the work of a step): accepted in the TOML file, not offered as flags here.
# warmup_steps in particular would clash with the benchmark's own --warmup-steps.
RUN_ONLY_KEYS = (
    "name",
    "storage_path",
    "cpus_per_worker",
    "use_gpu",
    "address",
    "resume",
    "overwrite",
    "max_failures",
    "start_timeout_s",
    "min_lr",
    "warmup_steps",
    "decay_lr",
    "lr_decay_steps",
    "max_steps",
    "eval_interval",
    "eval_iters",
    "log_interval",
    "checkpoint_interval",
    "keep_checkpoints",
    "divergence_factor",
)
BENCH_KEYS = ("warmup_steps", "bench_steps", "compare", "json", "synthetic", "vocab_size", "device")
SYNTHETIC_CHAR_VOCAB = 256  # --synthetic with a char tokenizer and no --vocab-size
GPT2_VOCAB = 50257


@dataclass
class Variant:
    name: str
    dtype: torch.dtype
    compile: bool


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m raygpt.bench",
        description="Time training steps of a raygpt model in this process (no Ray).",
    )
    p.add_argument("experiment", nargs="?", help="experiment TOML file (keys as below)")
    bench = p.add_argument_group("benchmark")
    bench.add_argument(
        "--warmup-steps", type=int, default=5, help="untimed steps first (default 5)"
    )
    bench.add_argument("--bench-steps", type=int, default=20, help="timed steps (default 20)")
    bench.add_argument(
        "--compare",
        action="store_true",
        help="run fp32 / bf16 / bf16+compile (CUDA) or fp32 eager / compile (CPU) side by side",
    )
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    bench.add_argument(
        "--synthetic",
        action="store_true",
        help="random tokens instead of batches of the configured dataset",
    )
    bench.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="with --tokenizer bpe: the BPE's size (the config key); with --synthetic: the "
        f"random tokens' vocabulary (default {GPT2_VOCAB} for gpt2, "
        f"{SYNTHETIC_CHAR_VOCAB} for char)",
    )
    bench.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1"
    )
    # vocab_size is the benchmark's own --vocab-size above, which serves both meanings.
    add_train_flags(
        p,
        exclude=(*RUN_ONLY_KEYS, "vocab_size"),
        title="config keys (TOML key = flag name)",
    )
    return p


# --------------------------------------------------------------------------- batches


def _uses_gpt2(cfg: TrainConfig) -> bool:
    if cfg.data_file is not None:
        return cfg.tokenizer == "gpt2"
    spec = sources.DATASETS.get(cfg.dataset)
    return cfg.init_from != "scratch" or (spec is not None and spec.tokenizer == "gpt2")


def make_batches(
    cfg: TrainConfig, n_steps: int, grad_accum: int, synthetic: bool, vocab_size: int | None
) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], int, str]:
    """(per step: grad_accum (x, y) CPU pairs, vocab size, description): rank 0's batches."""
    B, T = cfg.micro_batch_size(), cfg.block_size
    if synthetic:
        fallback = GPT2_VOCAB if _uses_gpt2(cfg) else SYNTHETIC_CHAR_VOCAB
        vocab = vocab_size or cfg.vocab_size or fallback  # cfg's: a BPE size from the TOML
        gen = torch.Generator().manual_seed(cfg.seed)
        steps = []
        for _ in range(n_steps):
            micro = []
            for _ in range(grad_accum):
                buf = torch.randint(vocab, (B, T + 1), generator=gen)
                micro.append((buf[:, :-1].contiguous(), buf[:, 1:].contiguous()))
            steps.append(micro)
        return steps, vocab, f"synthetic tokens (vocab {vocab})"
    dataset_dir, meta = prepare.prepare_from_config(cfg)
    with data_sampler.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed) as sampler:
        world = cfg.num_workers
        steps = [sampler.get_step(step, 0, B, world, grad_accum) for step in range(n_steps)]
    return steps, meta["vocab_size"], f"{meta['dataset']} train split (vocab {meta['vocab_size']})"


# --------------------------------------------------------------------------- timing


def variants_for(cfg: TrainConfig, device: torch.device, compare: bool) -> list[Variant]:
    if not compare:
        dtype = resolve_dtype(cfg.dtype, device)
        compiled = use_compile(cfg.compile, device)
        name = dtype_name(dtype) + (" autocast" if dtype != torch.float32 else "")
        return [Variant(name + (" + compile" if compiled else " eager"), dtype, compiled)]
    if device.type == "cuda":
        half = resolve_dtype("auto", device)
        half_name = dtype_name(half)
        return [
            Variant("fp32 (tf32 matmul)", torch.float32, False),
            Variant(f"{half_name} autocast", half, False),
            Variant(f"{half_name} autocast + compile", half, True),
        ]
    return [
        Variant("fp32 eager", torch.float32, False),
        Variant("fp32 + compile", torch.float32, True),
    ]


def run_variant(
    variant: Variant,
    cfg: TrainConfig,
    vocab_size: int,
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]],
    device: torch.device,
    warmup_steps: int,
) -> dict[str, Any]:
    """Train a freshly seeded model over `batches`; step times of the steps after warmup.

    The step is the training loop's own (`train_step`), timed as the loop times it
    (StepStats: end to end, the host-to-device copies and Python between updates
    included), read back once at the end. The first step, compile and warm-up, is left
    out of the times even with no warmup steps."""
    from raygpt.model.init_from import build_model
    from raygpt.train.optim import build_optimizer, set_lr

    runtime = Runtime(device, variant.dtype, variant.compile)
    runtime.configure()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab_size).to(device)
    # The variant's precision, not the config's, for what follows it (Muon's Newton-Schulz).
    optimizer = build_optimizer(
        model, dataclasses.replace(cfg, dtype=dtype_name(variant.dtype)), device.type
    )
    set_lr(optimizer, cfg.learning_rate)
    scaler = runtime.grad_scaler()
    train_model = runtime.maybe_compile(model)
    parameters = list(model.parameters())
    stats = StepStats(runtime.device, world_size=1)
    stats.start_attempt()
    for i, step_batches in enumerate(batches, start=1):
        on_device = [
            (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            for x, y in step_batches
        ]
        loss, grad_norm = train_step(
            train_model,
            parameters,
            optimizer,
            scaler,
            on_device,
            runtime.autocast,
            cfg.grad_clip,
        )
        stats.end_step(i, loss, grad_norm)
    readings = stats.read()
    timed = [r for r in readings[warmup_steps:] if not r.first]
    return {
        "step_seconds": [r.seconds for r in timed],
        "first_step_seconds": readings[0].seconds,
        "final_loss": readings[-1].train_loss,
        "flops_per_token": model.flops_per_token(),
        "n_params": model.n_params(),
    }


def _cleanup(device: torch.device) -> None:
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "ms/step (median)", "min..max ms", "tokens/s", "MFU", "speed-up", "loss")
    lines = []
    for r in rows:
        if r.get("skipped"):
            lines.append((r["variant"], "skipped", "", "", "", "", ""))
            continue
        lines.append(
            (
                r["variant"],
                f"{r['ms_per_step']:.2f}",
                f"{r['min_ms']:.1f}..{r['max_ms']:.1f}",
                f"{r['tokens_per_sec']:,.0f}",
                "n/a" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%",
                f"{r['speedup']:.2f}x",
                f"{r['final_loss']:.4f}",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join(
            [first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))]
        )

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def _check_bench_args(args: dict[str, Any]) -> None:
    if args["warmup_steps"] < 0:
        raise UserError(f"--warmup-steps must be >= 0, got {args['warmup_steps']}")
    if args["bench_steps"] < 1:
        raise UserError(f"--bench-steps must be >= 1, got {args['bench_steps']}")
    if args["warmup_steps"] == 0 and args["bench_steps"] == 1:
        raise UserError(
            "--bench-steps 1 with --warmup-steps 0 times nothing: the first step (compile, "
            "warm-up) is never timed; use --bench-steps 2 or more"
        )
    if args["vocab_size"] is not None and args["vocab_size"] < 1:
        raise UserError(f"--vocab-size must be >= 1, got {args['vocab_size']}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    bench = {key: args.pop(key) for key in BENCH_KEYS}
    experiment = args.pop("experiment")
    _check_bench_args(bench)
    if bench["vocab_size"] is not None and not bench["synthetic"]:
        args["vocab_size"] = bench["vocab_size"]  # real data: the size of a BPE to train
    cfg = load_train_config(experiment, args)
    device = resolve_device(bench["device"])
    grad_accum = cfg.grad_accum_steps()
    warmup, timed = bench["warmup_steps"], bench["bench_steps"]
    batches, vocab_size, source = make_batches(
        cfg, warmup + timed, grad_accum, bench["synthetic"], bench["vocab_size"]
    )
    tokens_per_step = cfg.micro_batch_size() * cfg.block_size * grad_accum
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = metrics.peak_flops(device_name, cfg.peak_tflops)
    print(
        f"[raygpt] bench on {device_name or device.type} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads): n_layer={cfg.n_layer} n_head={cfg.n_head} "
        f"n_embd={cfg.n_embd} block_size={cfg.block_size}, {cfg.micro_batch_size()} x {grad_accum} "
        f"sequences = {tokens_per_step:,} tokens/step, {cfg.optimizer}; {source}; "
        f"{warmup} warmup + {timed} timed steps",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    for variant in variants_for(cfg, device, bench["compare"]):
        print(f"[raygpt] running {variant.name} ...", flush=True)
        try:
            result = run_variant(variant, cfg, vocab_size, batches, device, warmup)
        except UserError:
            raise
        except Exception as err:
            if not variant.compile:
                raise
            reason = first_line(err, with_type=True)[:200]
            print(f"[raygpt] skipped {variant.name}: torch.compile failed ({reason})", flush=True)
            rows.append({"variant": variant.name, "skipped": reason})
            continue
        finally:
            _cleanup(device)
        median = statistics.median(result["step_seconds"])
        tokens_per_sec = tokens_per_step / median
        rows.append(
            {
                "variant": variant.name,
                "dtype": dtype_name(variant.dtype),
                "compile": variant.compile,
                "ms_per_step": median * 1000,
                "min_ms": min(result["step_seconds"]) * 1000,
                "max_ms": max(result["step_seconds"]) * 1000,
                "step_ms": [s * 1000 for s in result["step_seconds"]],
                "first_step_ms": result["first_step_seconds"] * 1000,
                "tokens_per_sec": tokens_per_sec,
                "mfu": metrics.mfu(result["flops_per_token"], tokens_per_sec, 1, peak),
                "final_loss": result["final_loss"],
                "n_params": result["n_params"],
            }
        )
    timed_rows = [r for r in rows if not r.get("skipped")]
    for r in timed_rows:
        r["speedup"] = timed_rows[0]["ms_per_step"] / r["ms_per_step"]
    print(format_table(rows))
    if timed_rows:
        print(f"tokens/s: {timed_rows[0]['tokens_per_sec']:,.0f} ({timed_rows[0]['variant']})")
    if bench["json"]:
        out = {
            "device": device_name or device.type,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "peak_tflops": None if peak is None else peak / 1e12,
            "tokens_per_step": tokens_per_step,
            "warmup_steps": warmup,
            "bench_steps": timed,
            "data": source,
            "config": redact_config(cfg.to_dict()),  # a results file: no URI's password
            "variants": rows,
        }
        path = Path(bench["json"]).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=2) + "\n")
        except OSError as err:
            raise UserError(f"cannot write {path} ({err.strerror or err})") from None
        print(f"[raygpt] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
