"""raygpt vs nanoGPT, piece by piece: data, init, optimizer, schedule, sampler, training, eval.

    python benchmarks/nanogpt_parity.py CHECK [--data-file PATH] [--nanogpt DIR] [options]

Checks (all in-process, no Ray, `--threads` torch threads, default 1):

  data      raygpt's prepared train/val token arrays and vocabulary vs nanoGPT's
            data/shakespeare_char/prepare.py rule (first 90% train, last 10% val,
            sorted(set(text)) vocabulary), array for array.
  init      both GPTs built after torch.manual_seed(seed) with the same config:
            parameter names, shapes, std, c_proj scaling, weight tying, counts,
            bitwise equality.
  optim     parameter groups (which tensors decay), AdamW settings, and the learning
            rate of raygpt's lr_at vs nanoGPT's get_lr at chosen steps and all steps.
  sampler   distinct windows raygpt's BatchSampler serves over max_steps vs
            nanoGPT's torch.randint windows: starts, start offsets mod block_size,
            epochs/shifts, tokens covered.
  lockstep  identical initial weights and identical batches for --steps updates,
            side A (raygpt: model, build_optimizer, lr_at) vs side B (nanoGPT:
            model, configure_optimizers, get_lr); --swap model,optim,lr gives side B
            raygpt's component instead, one at a time, to pinpoint any divergence.
  train     full training runs, --runner nanogpt (a faithful in-process replica of
            nanoGPT's train_driver.py: the global torch RNG drives init, train windows and
            the 20-batch evals at every eval_interval, in train_driver.py's order, so its
            printed val estimate reproduces `python train_driver.py ...` on the same torch)
            and/or --runner raygpt (the real `raygpt.train` run, in this process
            through Ray Train's local mode, scored from its final checkpoint; with
            --model, --sampler or --trace, the plain replica loop of
            val_loss_spread.py instead). Every final model is scored with
            the SAME estimators: `whole` (every val token, windows tiled at offsets
            0/16/32/48), `rand20` (nanoGPT's estimator: 20 random batches; mean and
            std over --repeats draws) and, for the raygpt runner, raygpt's eval set.
            (The nanoGPT runner also estimates at --stop-at/max_steps when that is
            not a multiple of eval_interval; train_driver.py would not.)
  replay    one trained model (--checkpoint: nanoGPT's ckpt.pt, or a file from
            train --save-dir) scored on exactly the val windows that train_driver.py's
            final eval draws for --seeds, vs --null-seeds other seeds and the whole
            split: is a low printed val loss a better model or a lucky draw?

The recipe is experiments/shakespeare_char_cpu.toml (= nanoGPT's README CPU command:
config/train_shakespeare_char.py --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20).
nanoGPT's model.py is loaded from --nanogpt with importlib; raygpt never imports it.

Examples:

    python benchmarks/nanogpt_parity.py data init optim sampler --data-file tinyshakespeare.txt
    python benchmarks/nanogpt_parity.py lockstep --steps 50 --swap model
    python benchmarks/nanogpt_parity.py train --runner nanogpt,raygpt --seeds 1337 --json out.json
    python benchmarks/nanogpt_parity.py replay --checkpoint out-shakespeare-char/ckpt.pt \
        --seeds 1337,1,2,3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # raygpt, when run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # val_loss_spread, beside this file

DEFAULT_EXPERIMENT = REPO / "experiments" / "shakespeare_char_cpu.toml"
# shared/ sits beside the checkout (../shared), here and in CI.
DEFAULT_NANOGPT = REPO.parent / "shared" / "reference" / "nanoGPT"
CHECKS = ("data", "init", "optim", "sampler", "lockstep", "train", "replay")
RUNNERS = ("nanogpt", "raygpt")
SWAPPABLE = ("model", "optim", "lr")
LR_STEPS = (0, 1, 99, 100, 101, 1000, 1999, 2000)
WHOLE_OFFSETS = (0, 16, 32, 48)


# --------------------------------------------------------------------------- setup


def load_nanogpt_model(nanogpt_dir: Path):
    """nanoGPT's model.py as a module (not importable by name: loaded from its path)."""
    path = Path(nanogpt_dir) / "model.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass --nanogpt DIR (a nanoGPT checkout)")
    spec = importlib.util.spec_from_file_location("nanogpt_reference_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet(fn, *args, **kwargs):
    """Call fn with its prints (nanoGPT's parameter counts etc.) swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


class Ctx:
    """The run config, the prepared dataset and nanoGPT's model module."""

    def __init__(self, args: argparse.Namespace, seed: int | None = None):
        from raygpt.config.train import load_train_config
        from raygpt.data import prepare
        from raygpt.data import sampler as data_sampler

        flags: dict[str, Any] = {}
        if args.data_file:
            flags["data_file"] = args.data_file
        if args.data_dir:
            flags["data_dir"] = args.data_dir
        if seed is not None:
            flags["seed"] = seed
        if args.max_steps:
            flags |= {"max_steps": args.max_steps, "lr_decay_steps": args.max_steps}
        self.cfg = load_train_config(args.experiment, flags)
        self.dataset_dir, self.meta = prepare.prepare_from_config(self.cfg)
        self.vocab_size = self.meta["vocab_size"]
        dtype = self.meta["dtype"]
        self.train = np.asarray(data_sampler.read_tokens(self.dataset_dir, "train"), dtype=dtype)
        self.val = np.asarray(data_sampler.read_tokens(self.dataset_dir, "val"), dtype=dtype)
        self.ng = load_nanogpt_model(args.nanogpt)

    def nanogpt_config(self):
        c = self.cfg
        return self.ng.GPTConfig(
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            block_size=c.block_size,
            vocab_size=self.vocab_size,  # nanoGPT takes meta.pkl's vocab_size, unpadded
            bias=c.bias,
            dropout=c.dropout,
        )

    def build(self, kind: str, seed: int | None = None) -> torch.nn.Module:
        """A fresh model of `kind` (raygpt | nanogpt); seeded first when seed is given."""
        from raygpt.model import init_from

        if seed is not None:
            torch.manual_seed(seed)
        if kind == "raygpt":
            return init_from.build_model(self.cfg, self.vocab_size)
        return quiet(self.ng.GPT, self.nanogpt_config())

    def optimizer(self, kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
        """raygpt's build_optimizer(configure_param_groups) or nanoGPT's configure_optimizers
        (called unbound, so it works on either model: it only reads named_parameters)."""
        from raygpt.model.gpt import GPT
        from raygpt.train.optim import build_optimizer

        c = self.cfg
        if kind == "raygpt":  # unbound as well: it only reads parameters()
            return build_optimizer(GPT.configure_param_groups(model, c.weight_decay), c, "cpu")
        return quiet(
            self.ng.GPT.configure_optimizers,
            model,
            c.weight_decay,
            c.learning_rate,
            (c.beta1, c.beta2),
            "cpu",
        )

    def lr(self, kind: str, step: int) -> float:
        from raygpt.train.lr_schedule import lr_at

        return lr_at(step, self.cfg) if kind == "raygpt" else nanogpt_get_lr(step, self.cfg)


def nanogpt_get_lr(it: int, cfg) -> float:
    """nanoGPT train_driver.py's get_lr, verbatim, with its globals taken from the raygpt config."""
    learning_rate, warmup_iters = cfg.learning_rate, cfg.warmup_steps
    lr_decay_iters, min_lr = cfg.resolved_lr_decay_steps, cfg.resolved_min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def windows(tokens: np.ndarray, starts, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: x = data[i:i+T], y = data[i+1:i+1+T] for each start i."""
    x = torch.stack([torch.from_numpy(tokens[i : i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack(
        [torch.from_numpy(tokens[i + 1 : i + 1 + block_size].astype(np.int64)) for i in starts]
    )
    return x, y


# --------------------------------------------------------------------------- estimators


def whole_split_loss(model, tokens: np.ndarray, block_size: int) -> float:
    """Mean next-token loss over the whole split, windows tiled at each of WHOLE_OFFSETS
    (every context length 0..block_size-1 equally often, like random windows); the
    estimator of val_loss_spread.py, in eval mode."""
    from val_loss_spread import whole_split_loss as tiled

    was_training = model.training
    model.eval()
    try:
        return tiled(model, tokens, block_size, offsets=WHOLE_OFFSETS)
    finally:
        model.train(was_training)


@torch.no_grad()
def random20(model, tokens, block_size, batch_size, eval_iters, repeats, seed=7) -> list[float]:
    """nanoGPT's estimate_loss for one split, `repeats` independent times."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        losses = []
        for _ in range(eval_iters):
            ix = torch.randint(len(tokens) - block_size, (batch_size,), generator=gen)
            losses.append(model(*windows(tokens, ix.tolist(), block_size))[1].item())
        out.append(statistics.fmean(losses))
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- checks


def check_data(ctx: Ctx, args) -> dict:
    """Item 1: raygpt's split vs nanoGPT's prepare.py applied to the same text."""
    source = args.data_file or (ctx.meta.get("source") if ctx.cfg.data_file else None)
    if source is None or not Path(source).is_file():
        print("data: needs --data-file (the raw text) to rebuild nanoGPT's split")
        return {}
    with open(source) as f:  # prepare.py: open(input_file_path, 'r').read()
        text = f.read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    ng_train = np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16)
    ng_val = np.array([stoi[c] for c in text[int(n * 0.9) :]], dtype=np.uint16)
    res = {
        "chars": n,
        "vocab_equal": ctx.meta.get("itos") == chars,
        "vocab_size": [ctx.vocab_size, len(chars)],
        "train_tokens": [len(ctx.train), len(ng_train)],
        "val_tokens": [len(ctx.val), len(ng_val)],
        "train_equal": bool(np.array_equal(ctx.train.astype(np.int64), ng_train)),
        "val_equal": bool(np.array_equal(ctx.val.astype(np.int64), ng_val)),
        "dtype": [ctx.meta["dtype"], "uint16"],
    }
    print("== data (raygpt vs nanoGPT prepare.py)")
    for k, v in res.items():
        print(f"  {k:<13} {v}")
    return res


def check_init(ctx: Ctx, args) -> dict:
    """Item 2: the two GPTs after the same seed."""
    seed = ctx.cfg.seed
    a, b = ctx.build("raygpt", seed), ctx.build("nanogpt", seed)
    sa, sb = a.state_dict(), b.state_dict()
    print(f"== init (seed {seed}; std raygpt / nanoGPT; '=' bitwise equal)")
    rows = []
    for k in sorted(set(sa) | set(sb), key=lambda k: list(sa).index(k) if k in sa else 1e9):
        ta, tb = sa.get(k), sb.get(k)
        if ta is None or tb is None:
            print(f"  {k:<36} only in {'raygpt' if tb is None else 'nanoGPT'}")
            rows.append({"name": k, "only": "raygpt" if tb is None else "nanogpt"})
            continue
        same_shape = ta.shape == tb.shape
        eq = same_shape and torch.equal(ta, tb)
        sda, sdb = ta.float().std().item(), tb.float().std().item()
        rows.append({"name": k, "shape": list(ta.shape), "std": [sda, sdb], "equal": eq})
        shape = "x".join(map(str, ta.shape)) + ("" if same_shape else f" vs {tuple(tb.shape)}")
        print(f"  {k:<36} {shape:>9}  {sda:.5f} / {sdb:.5f} {'=' if eq else 'DIFFERENT'}")
    res = {
        "params": [sum(p.numel() for p in a.parameters()), sum(p.numel() for p in b.parameters())],
        "non_embedding": [a.n_params(), b.get_num_params()],
        "tied": [
            a.lm_head.weight is a.transformer.wte.weight,
            b.lm_head.weight is b.transformer.wte.weight,
        ],
        "vocab_rows": [a.lm_head.weight.shape[0], b.lm_head.weight.shape[0]],
        "c_proj_target_std": ctx.cfg.n_layer and 0.02 / math.sqrt(2 * ctx.cfg.n_layer),
        "all_equal": all(r.get("equal") for r in rows),
        "gelu": [repr(a.transformer.h[0].mlp.gelu), repr(b.transformer.h[0].mlp.gelu)],
        "tensors": rows,
    }
    for k in ("params", "non_embedding", "tied", "vocab_rows", "c_proj_target_std", "gelu"):
        print(f"  {k:<18} {res[k]}")
    print(f"  all tensors bitwise equal: {res['all_equal']}")
    return res


def check_optim(ctx: Ctx, args) -> dict:
    """Item 3: parameter groups, AdamW settings, learning rates."""
    cfg = ctx.cfg
    a, b = ctx.build("raygpt", cfg.seed), ctx.build("nanogpt", cfg.seed)
    oa, ob = ctx.optimizer("raygpt", a), ctx.optimizer("nanogpt", b)
    names_a = {id(p): n for n, p in a.named_parameters()}
    names_b = {id(p): n for n, p in b.named_parameters()}
    print("== optimizer (raygpt vs nanoGPT)")
    groups = []
    for i, (ga, gb) in enumerate(zip(oa.param_groups, ob.param_groups, strict=True)):
        na = [names_a[id(p)] for p in ga["params"]]
        nb = [names_b[id(p)] for p in gb["params"]]
        sa = {k: v for k, v in ga.items() if k != "params"}
        sb = {k: v for k, v in gb.items() if k != "params"}
        groups.append({"names_equal": na == nb, "settings_equal": sa == sb, "settings": sa})
        print(
            f"  group {i}: {len(na)} / {len(nb)} tensors, {sum(p.numel() for p in ga['params'])}"
            f" params, weight_decay {ga['weight_decay']} / {gb['weight_decay']}, same tensors"
            f" {na == nb}, same settings {sa == sb}"
        )
    s = groups[0]["settings"]
    print(
        f"  AdamW {type(oa).__name__}/{type(ob).__name__}: betas {s['betas']} eps {s['eps']} "
        f"fused {s['fused']} foreach {s['foreach']}"
    )
    print("  step        raygpt lr_at   nanoGPT get_lr")
    table = []
    for step in LR_STEPS:
        la, lb = ctx.lr("raygpt", step), ctx.lr("nanogpt", step)
        table.append([step, la, lb])
        print(f"  {step:>5} {la:>17.10g} {lb:>16.10g}{'' if la == lb else '  DIFFERENT'}")
    span = range(cfg.max_steps + 1)
    worst = max(abs(ctx.lr("raygpt", s) - ctx.lr("nanogpt", s)) for s in span)
    print(f"  max |difference| over steps 0..{cfg.max_steps}: {worst:g}")
    return {"groups": groups, "lr_table": table, "lr_max_abs_diff": worst}


def check_sampler(ctx: Ctx, args) -> dict:
    """Item 5: how many distinct windows each sampler serves in a run."""
    from raygpt.data import sampler as data_sampler

    cfg = ctx.cfg
    B, T, steps = cfg.batch_size, cfg.block_size, cfg.max_steps
    sampler = data_sampler.BatchSampler(ctx.dataset_dir, "train", T, cfg.seed)
    starts_r = np.concatenate([sampler.sample_indices(s, 0, 0, B, 1, 1) for s in range(steps)])
    gen = torch.Generator().manual_seed(cfg.seed)
    starts_n = torch.randint(len(ctx.train) - T, (steps * B,), generator=gen).numpy()
    n_tok = len(ctx.train)

    def stats(starts: np.ndarray) -> dict:
        covered = np.zeros(n_tok, dtype=bool)
        for s in starts:
            covered[s + 1 : s + 1 + T] = True  # target tokens
        return {
            "windows": len(starts),
            "distinct_starts": len(np.unique(starts)),
            "distinct_offsets_mod_T": len(np.unique(starts % T)),
            "target_tokens_covered": float(covered.mean()),
        }

    per_epoch = sampler.steps_per_epoch(B)
    res = {
        "raygpt": stats(starts_r)
        | {
            "windows_per_epoch": sampler.num_windows,
            "steps_per_epoch": per_epoch,
            "epochs_touched": math.ceil(steps / per_epoch),
            "possible_starts": sampler.num_windows * (sampler.max_shift + 1),
        },
        "nanogpt": stats(starts_n) | {"possible_starts": n_tok - T},
    }
    print(f"== sampler ({steps} steps x {B} windows of {T}; train split {n_tok:,} tokens)")
    keys = list(res["raygpt"]) + [k for k in res["nanogpt"] if k not in res["raygpt"]]
    print(f"  {'':<24}{'raygpt':>12}{'nanoGPT':>12}")
    for k in keys:
        va, vb = res["raygpt"].get(k, ""), res["nanogpt"].get(k, "")
        fmt = (lambda v: f"{v:>12.3f}") if isinstance(va, float) else (lambda v: f"{v!s:>12}")
        print(f"  {k:<24}{fmt(va)}{fmt(vb)}")
    return res


def check_lockstep(ctx: Ctx, args) -> dict:
    """Item 4: identical init + identical batches, each side with its own components."""
    cfg = ctx.cfg
    swap = [s for s in (args.swap or "").split(",") if s]
    side_b = {c: ("raygpt" if c in swap else "nanogpt") for c in SWAPPABLE}
    a = ctx.build("raygpt", cfg.seed)
    b = ctx.build(side_b["model"], cfg.seed)
    b.load_state_dict(a.state_dict())  # identical start whatever the init code did
    oa, ob = ctx.optimizer("raygpt", a), ctx.optimizer(side_b["optim"], b)
    from raygpt.data import sampler as data_sampler

    sampler = data_sampler.BatchSampler(ctx.dataset_dir, "train", cfg.block_size, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    print(
        f"== lockstep {args.steps} steps, batches from {args.batches}; side A all raygpt, side B"
        f" model={side_b['model']} optim={side_b['optim']} lr={side_b['lr']}"
    )
    print("  step   loss A      loss B      |dloss|    gnorm A   gnorm B   |dgnorm|   lr equal")
    rows = []
    for step in range(args.steps):
        if args.batches == "raygpt":
            x, y = sampler.get_batch(step, 0, 0, cfg.batch_size, 1, 1)
        else:
            ix = torch.randint(len(ctx.train) - cfg.block_size, (cfg.batch_size,), generator=gen)
            x, y = windows(ctx.train, ix.tolist(), cfg.block_size)
        out = []
        for model, opt, lr_kind in ((a, oa, "raygpt"), (b, ob, side_b["lr"])):
            lr = ctx.lr(lr_kind, step)
            for g in opt.param_groups:
                g["lr"] = lr
            _, loss = model(x, y)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append((loss.item(), gn.item(), lr))
        (la, ga, lra), (lb, gb, lrb) = out
        rows.append({"step": step, "loss": [la, lb], "grad_norm": [ga, gb], "lr": [lra, lrb]})
        if step < 3 or (step + 1) % max(args.steps // 10, 1) == 0:
            print(
                f"  {step:>4} {la:>10.6f} {lb:>10.6f} {abs(la - lb):>10.2e} {ga:>9.5f} {gb:>9.5f}"
                f" {abs(ga - gb):>9.2e}   {lra == lrb}"
            )
    pa, pb = a.state_dict(), b.state_dict()
    pdiff = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    res = {
        "side_b": side_b,
        "max_abs_dloss": max(abs(r["loss"][0] - r["loss"][1]) for r in rows),
        "max_abs_dgrad_norm": max(abs(r["grad_norm"][0] - r["grad_norm"][1]) for r in rows),
        "final_max_abs_param_diff": pdiff,
        "rows": rows,
    }
    print(
        f"  max |dloss| {res['max_abs_dloss']:.3e}, max |dgrad_norm| "
        f"{res['max_abs_dgrad_norm']:.3e}, final max |dparam| {pdiff:.3e}"
    )
    return res


# --------------------------------------------------------------------------- training


def train_nanogpt(ctx: Ctx, model_kind: str, args) -> dict:
    """nanoGPT's train_driver.py loop (single process, CPU, no compile, float32), in its order.

    torch.manual_seed(seed); model; optimizer; X, Y = get_batch('train'); then per iter:
    lr; every eval_interval estimate_loss() (train then val, eval_iters random batches
    each, from the same global RNG); forward; prefetch the next batch; backward; clip;
    step. The val estimate at iter max_iters is the number train_driver.py prints last.
    """
    cfg = ctx.cfg
    T, B = cfg.block_size, cfg.batch_size
    torch.manual_seed(cfg.seed)
    model = ctx.build(model_kind)
    optimizer = ctx.optimizer("nanogpt", model)

    def get_batch(split):
        data = ctx.train if split == "train" else ctx.val
        ix = torch.randint(len(data) - T, (B,))
        return windows(data, ix, T)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                _, loss = model(*get_batch(split))
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    evals = {}
    stop = args.stop_at or cfg.max_steps
    X, Y = get_batch("train")
    started = time.perf_counter()
    for it in range(stop + 1):
        lr = nanogpt_get_lr(it, cfg) if cfg.decay_lr else cfg.learning_rate
        for g in optimizer.param_groups:
            g["lr"] = lr
        if it % cfg.eval_interval == 0 or it == stop:  # train_driver.py: only the former
            evals[it] = estimate_loss()
            print(f"  [nanogpt/{model_kind} seed {cfg.seed}] step {it}: {evals[it]}", flush=True)
        if it == stop:
            break  # train_driver.py does one more update here; it changes nothing it reports
        _, loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        if cfg.grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.trace and it < args.trace:
            print(f"  iter {it}: loss {loss.item():.4f}")
    return {
        "model": model,
        "train_seconds": time.perf_counter() - started,
        "in_loop_val": evals.get(stop, {}).get("val"),
        "in_loop_evals": evals,
    }


def train_raygpt_cli(ctx: Ctx, args) -> dict:
    """The real command: `raygpt.train.run` (one worker, in this process through Ray
    Train's local mode, as `python -m raygpt.train` runs on a laptop), then the model of
    its final checkpoint."""
    import dataclasses
    import shutil
    import tempfile

    from raygpt import checkpoint
    from raygpt.train import driver as train_driver

    storage = tempfile.mkdtemp(prefix="raygpt-parity-")
    try:
        cfg = dataclasses.replace(
            ctx.cfg,
            storage_path=storage,
            name=f"parity-seed{ctx.cfg.seed}",
            in_process="true",
            cpus_per_worker=float(args.threads),
            max_steps=args.stop_at or ctx.cfg.max_steps,
        )
        started = time.perf_counter()
        summary = quiet(train_driver.run, cfg)
        seconds = time.perf_counter() - started
        state = checkpoint.load(checkpoint.latest_in_run(f"{storage}/{cfg.name}"))
        model = ctx.build("raygpt")
        model.load_state_dict(state["model"])
        model.eval()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return {"model": model, "train_seconds": seconds, "eval_set": summary["val_loss"]}


def train_raygpt(ctx: Ctx, model_kind: str, args) -> dict:
    """raygpt's loop on one rank without Ray (as val_loss_spread.py / train_vs_plain.py)."""
    if model_kind == "raygpt" and args.sampler == "raygpt" and not args.trace:
        return train_raygpt_cli(ctx, args)
    from raygpt.data import sampler as data_sampler

    cfg = ctx.cfg
    model = ctx.build(model_kind, cfg.seed)
    optimizer = ctx.optimizer("raygpt", model)
    sampler = data_sampler.BatchSampler(ctx.dataset_dir, "train", cfg.block_size, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    accum = cfg.grad_accum_steps(1)
    B, T = cfg.batch_size, cfg.block_size
    started = time.perf_counter()
    for step in range(args.stop_at or cfg.max_steps):
        lr = ctx.lr("raygpt", step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(accum):
            if args.sampler == "raygpt":
                x, y = sampler.get_batch(step, 0, micro, B, 1, accum)
            else:
                ix = torch.randint(len(ctx.train) - T, (B,), generator=gen)
                x, y = windows(ctx.train, ix, T)
            _, loss = model(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_interval == 0:
            print(f"  [raygpt/{model_kind} seed {cfg.seed}] step {step + 1}", flush=True)
        if args.trace and step < args.trace:
            print(f"  step {step}: loss {loss.item():.4f}")
    val_sampler = data_sampler.BatchSampler(ctx.dataset_dir, "val", T, cfg.seed)
    model.eval()
    with torch.no_grad():
        fixed = val_sampler.eval_batches(cfg.eval_iters, B, 0, 1)
        eval_set = statistics.fmean(model(x, y)[1].item() for x, y in fixed)
    return {"model": model, "train_seconds": time.perf_counter() - started, "eval_set": eval_set}


def check_train(ctx_factory, args) -> dict:
    runners = [r for r in args.runner.split(",") if r]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        ctx = ctx_factory(seed)
        cfg = ctx.cfg
        for runner in runners:
            model_kind = args.model or runner
            fn = train_nanogpt if runner == "nanogpt" else train_raygpt
            out = fn(ctx, model_kind, args)
            model = out.pop("model")
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                saved = Path(args.save_dir) / f"{runner}-{model_kind}-seed{seed}.pt"
                torch.save(model.state_dict(), saved)
                out["saved"] = str(saved)
            reps = random20(
                model, ctx.val, cfg.block_size, cfg.batch_size, cfg.eval_iters, args.repeats
            )
            row = {
                "runner": runner,
                "model": model_kind,
                "sampler": "torch.randint (global RNG)" if runner == "nanogpt" else args.sampler,
                "seed": seed,
                "steps": args.stop_at or cfg.max_steps,
                "whole": whole_split_loss(model, ctx.val, cfg.block_size),
                "rand20_mean": statistics.fmean(reps),
                "rand20_std": statistics.pstdev(reps),
                **out,
            }
            rows.append(row)
            print(
                f"  -> {runner} seed {seed}: whole {row['whole']:.4f}  rand20 "
                f"{row['rand20_mean']:.4f}±{row['rand20_std']:.4f}  in-loop val "
                f"{row.get('in_loop_val') or float('nan'):.4f}  raygpt eval set "
                f"{row.get('eval_set') or float('nan'):.4f}  ({row['train_seconds']:.0f}s)",
                flush=True,
            )
    print("\n== train: final val loss, same estimators for every run")
    print(
        f"  {'runner':<8}{'seed':>6}{'whole split':>13}{'rand20 mean±std':>19}"
        f"{'in-loop 20-batch':>18}{'raygpt eval set':>17}"
    )
    for r in rows:
        rand = f"{r['rand20_mean']:.4f}±{r['rand20_std']:.4f}"
        il = f"{r['in_loop_val']:.4f}" if r.get("in_loop_val") is not None else "-"
        es = f"{r['eval_set']:.4f}" if r.get("eval_set") is not None else "-"
        print(f"  {r['runner']:<8}{r['seed']:>6}{r['whole']:>13.4f}{rand:>19}{il:>18}{es:>17}")
    for runner in runners:
        whole = [r["whole"] for r in rows if r["runner"] == runner]
        sd = statistics.stdev(whole) if len(whole) > 1 else 0.0
        print(
            f"  {runner}: whole-split mean over {len(whole)} seed(s) {statistics.fmean(whole):.4f}"
            f" ± {sd:.4f}"
        )
    return {"rows": rows}


# --------------------------------------------------------------------------- replay


def nanogpt_eval_windows(ctx: Ctx, seed: int, at_step: int) -> np.ndarray:
    """The val window starts nanoGPT's train_driver.py draws for its eval at iter `at_step`
    (a multiple of eval_interval) with torch.manual_seed(seed): the global RNG replayed
    through model init, the first batch, one batch per iter and the earlier evals."""
    cfg = ctx.cfg
    T, B = cfg.block_size, cfg.batch_size
    n_train, n_val = len(ctx.train) - T, len(ctx.val) - T
    torch.manual_seed(seed)
    ctx.build("nanogpt")  # init consumes the RNG
    torch.randint(n_train, (B,))  # X, Y = get_batch('train') before the loop
    for it in range(at_step):
        if it % cfg.eval_interval == 0:
            for n in (n_train, n_val):
                for _ in range(cfg.eval_iters):
                    torch.randint(n, (B,))
        torch.randint(n_train, (B,))
    for _ in range(cfg.eval_iters):  # estimate_loss: the train split first
        torch.randint(n_train, (B,))
    return torch.cat([torch.randint(n_val, (B,)) for _ in range(cfg.eval_iters)]).numpy()


def check_replay(ctx: Ctx, args) -> dict:
    """Score one trained model on the val windows nanoGPT's step-max_steps eval drew for
    --seeds, against the same estimator for --null-seeds other seeds and the whole split:
    tells a lucky 20-batch draw from a better model."""
    if not args.checkpoint:
        raise SystemExit("error: replay needs --checkpoint (nanoGPT ckpt.pt or train --save-dir)")
    cfg = ctx.cfg
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state = state.get("model", state)  # nanoGPT's ckpt.pt keeps it under "model"
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model = ctx.build(args.model or "nanogpt")
    model.load_state_dict(state)
    model.eval()
    T, B = cfg.block_size, cfg.batch_size

    @torch.no_grad()
    def score(starts: np.ndarray) -> float:
        return statistics.fmean(
            model(*windows(ctx.val, starts[i : i + B], T))[1].item()
            for i in range(0, len(starts), B)
        )

    whole = whole_split_loss(model, ctx.val, T)
    at = cfg.max_steps - cfg.max_steps % cfg.eval_interval
    named = {int(s): score(nanogpt_eval_windows(ctx, int(s), at)) for s in args.seeds.split(",")}
    null_seeds = range(10_000, 10_000 + args.null_seeds)
    null = [score(nanogpt_eval_windows(ctx, s, at)) for s in null_seeds]
    mu, sd = statistics.fmean(null), statistics.pstdev(null)
    print(f"== replay: {args.checkpoint}, val windows of nanoGPT's step-{at} eval")
    print(f"  whole split {whole:.4f}; {len(null)} other seeds: {mu:.4f} ± {sd:.4f}")
    for s, v in named.items():
        print(f"  seed {s:>6}: {v:.4f}  ({(v - mu) / sd:+.2f} sd)")
    return {"whole": whole, "at_step": at, "named": named, "null_mean": mu, "null_std": sd}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("checks", nargs="+", choices=CHECKS, metavar="CHECK", help=", ".join(CHECKS))
    p.add_argument("--experiment", default=str(DEFAULT_EXPERIMENT))
    p.add_argument("--data-file", default=None, help="raw text (Tiny Shakespeare)")
    p.add_argument("--data-dir", default=None, help="raygpt's prepared-dataset cache")
    p.add_argument("--nanogpt", type=Path, default=DEFAULT_NANOGPT, help="nanoGPT checkout")
    p.add_argument("--seed", type=int, default=None, help="for data/init/optim/sampler/lockstep")
    p.add_argument("--max-steps", type=int, default=None, help="also sets lr_decay_steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="lockstep: updates")
    p.add_argument(
        "--batches",
        choices=("raygpt", "random"),
        default="raygpt",
        help="lockstep: where the shared batches come from",
    )
    p.add_argument("--swap", default="", help=f"lockstep: side B takes raygpt's {SWAPPABLE}")
    p.add_argument("--runner", default="nanogpt,raygpt", help="train: nanogpt,raygpt")
    p.add_argument(
        "--model",
        choices=("raygpt", "nanogpt"),
        default=None,
        help="train: model class (default: the runner's own)",
    )
    p.add_argument(
        "--sampler",
        choices=("raygpt", "random"),
        default="raygpt",
        help="train, raygpt runner: BatchSampler or torch.randint windows",
    )
    p.add_argument("--seeds", default="1337", help="train, replay: comma-separated seeds")
    p.add_argument("--repeats", type=int, default=20, help="train: rand20 draws per model")
    p.add_argument("--trace", type=int, default=0, help="train: print the first N step losses")
    p.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="train: stop after N updates, keeping max_steps' schedule (debugging)",
    )
    p.add_argument("--save-dir", default=None, help="train: save each final model here")
    p.add_argument("--checkpoint", default=None, help="replay: a nanoGPT ckpt.pt or saved model")
    p.add_argument("--null-seeds", type=int, default=40, help="replay: seeds for the null")
    p.add_argument("--json", default=None, help="write all results here")
    a = p.parse_args(argv)
    bad = [s for s in a.swap.split(",") if s and s not in SWAPPABLE]
    if bad:
        p.error(f"--swap takes {', '.join(SWAPPABLE)}, got {bad[0]}")
    if any(r not in RUNNERS for r in a.runner.split(",") if r):
        p.error(f"--runner takes {', '.join(RUNNERS)}")
    torch.set_num_threads(a.threads)

    from raygpt.errors import UserError

    results: dict[str, Any] = {}
    try:
        ctx = Ctx(a, a.seed)
        for check in a.checks:
            if check == "train":
                results["train"] = check_train(lambda seed: Ctx(a, seed), a)
            else:
                results[check] = globals()[f"check_{check}"](ctx, a)
            print()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
