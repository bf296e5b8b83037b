"""The coordinate check: does a parametrization keep every layer's activations the same
size as the model widens (and, for completep, deepens)?

For each width (and depth) the experiment's model is built from scratch
(`model.init_from.build_model`, seeded as a run is), trained a few steps in this process by
the loop's own update (`train.step.train_step`, `train.optim`, the data sampler), and
forward hooks record the root mean square of each layer type's output at every step:

- embedding: the input of the first block (token + position embeddings, x alpha_in);
- attention, mlp: each block's attention and MLP output, before it joins the residual
  stream (all blocks together);
- residual: the last block's output, the residual stream before ln_f;
- logits: the head's output.

A step's numbers are taken during its forward pass, so step 1 is the model at init. The
check fits log RMS against log width (or depth) at the last step, one slope per layer
type: the flat lines that microsoft/mup's and nanoGPT-mup's coordinate-check figures are
read by, as a number. Under mup and completep every slope should be near 0; under sp the
logits grow (with Adam about linearly in width: the update of the tied head adds up
along n_embd coordinates), which is what the check reports as sp's expected growth.

The learning rate is constant (no warmup, no decay), as in nanoGPT-mup's coordinate
checks: the check looks at the size of a few updates, not at a schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygpt.config.train import TrainConfig
from raygpt.data import prepare
from raygpt.data import sampler as data_sampler
from raygpt.errors import UserError
from raygpt.runtime import Runtime
from raygpt.train.lr_schedule import lr_at
from raygpt.train.optim import build_optimizer, set_lr
from raygpt.train.step import train_step

LAYER_TYPES = ("embedding", "attention", "mlp", "residual", "logits")
AXES = ("width", "depth")
# |slope| at or below this is flat: over 64..1024 (16x) the RMS changes by at most
# 16^0.2 = 1.7x, where sp's logits grow about 16x.
DEFAULT_TOLERANCE = 0.2
DEFAULT_STEPS = 10  # nanoGPT-mup's coordinate checks train 10 steps


@dataclass(frozen=True)
class Verdict:
    """One layer type's line: its slope and what was expected of it."""

    axis: str
    layer: str
    slope: float
    expected: str  # "flat", "grows" or "" (only reported)
    passed: bool | None  # None: nothing was expected of it

    def line(self, tolerance: float) -> str:
        if self.expected == "flat":
            want = f"|slope| <= {tolerance:g}"
        elif self.expected == "grows":
            want = f"slope > {tolerance:g}: the growth expected here"
        else:
            want = "reported only"
        outcome = {True: "pass", False: "FAIL", None: "-"}[self.passed]
        return f"  {self.axis:<5}  {self.layer:<9}  slope {self.slope:+.3f}  {outcome:<4}  ({want})"


def expectation(parametrization: str, axis: str, layer: str) -> str:
    """What a layer type's slope should do: "flat", "grows" or "" (nothing claimed).

    In width, mup and completep keep every layer type flat and sp's logits grow (what
    its other layers do depends on the optimizer: reported). In depth the claim is the
    residual stream's, as nanoGPT-mup's depth check draws it: completep's stays flat,
    mup's grows (each block's update adds up along the depth), which completep's 1/depth
    branches remove; the branches' own outputs are reported."""
    if axis == "width":
        if parametrization == "sp":
            return "grows" if layer == "logits" else ""
        return "flat"
    if layer == "residual":
        return "flat" if parametrization == "completep" else "grows"
    if layer in ("embedding", "logits") and parametrization == "completep":
        return "flat"
    return ""


class _Recorder:
    """Forward hooks summing each layer type's mean square, per step."""

    def __init__(self, model: torch.nn.Module):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        blocks = model.transformer.h
        targets = [("embedding", model.transformer.drop), ("logits", model.lm_head)]
        targets += [("attention", b.attn) for b in blocks] + [("mlp", b.mlp) for b in blocks]
        targets.append(("residual", blocks[-1]))
        self.handles = [m.register_forward_hook(self._hook(layer)) for layer, m in targets]

    def _hook(self, layer: str):
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            value = output.detach().float().pow(2).mean().item()
            self.sums[layer] = self.sums.get(layer, 0.0) + value
            self.counts[layer] = self.counts.get(layer, 0) + 1

        return hook

    def take(self) -> dict[str, float]:
        """Each layer type's RMS since the last take, and start afresh."""
        rms = {k: math.sqrt(self.sums[k] / self.counts[k]) for k in self.sums}
        self.sums, self.counts = {}, {}
        return rms

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def sized_config(cfg: TrainConfig, axis: str, size: int) -> TrainConfig:
    """The experiment's config at one width (n_embd) or depth (n_layer), validated: a
    width that n_head does not divide is one line naming it."""
    key, flag = ("n_embd", "--widths") if axis == "width" else ("n_layer", "--depths")
    try:
        return dataclasses.replace(cfg, **{key: size}).validate()
    except UserError as err:
        raise UserError(f"{flag} {size}: {err}") from None


def measure(
    cfg: TrainConfig,
    steps: int,
    vocab_size: int,
    dataset_dir: Any,
    device: str = "cpu",
) -> list[dict[str, float]]:
    """Train cfg's model `steps` updates from its seed; each step's RMS per layer type."""
    from raygpt.model.init_from import build_model  # the run's own model

    runtime = Runtime.create(torch.device(device), "float32", "false")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab_size).to(runtime.device)
    optimizer = build_optimizer(model, cfg, runtime.device.type)
    scaler = runtime.grad_scaler()
    parameters = list(model.parameters())
    micro, accum = cfg.micro_batch_size(), cfg.grad_accum_steps()
    recorder = _Recorder(model)
    per_step = []
    try:
        with data_sampler.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed) as sampler:
            for step in range(steps):
                set_lr(optimizer, lr_at(step, cfg))
                batches = [
                    (x.to(runtime.device), y.to(runtime.device))
                    for x, y in sampler.get_step(step, 0, micro, 1, accum)
                ]
                train_step(
                    model, parameters, optimizer, scaler, batches, runtime.autocast, cfg.grad_clip
                )
                per_step.append(recorder.take())
    finally:
        recorder.remove()
    return per_step


def run(
    cfg: TrainConfig,
    widths: Sequence[int],
    depths: Sequence[int] = (),
    steps: int = DEFAULT_STEPS,
    seeds: int = 1,
    device: str = "cpu",
    log: Any = None,
) -> list[dict[str, Any]]:
    """The rows of a coordinate check: one per (axis, size, seed, step, layer type).

    Width runs use cfg's n_layer; depth runs cfg's n_embd. The learning rate is cfg's,
    held constant."""
    if cfg.init_from != "scratch":
        raise UserError(
            f"the coordinate check builds fresh models at each size; init_from="
            f"{cfg.init_from} has one size: leave init_from out"
        )
    if steps < 1 or seeds < 1:
        raise UserError(f"--steps and --seeds must be >= 1, got {steps} and {seeds}")
    for axis, sizes in (("width", widths), ("depth", depths)):
        if sizes and len(set(sizes)) < 2:
            raise UserError(f"--{axis}s needs two sizes or more to fit a slope, got {list(sizes)}")
        if any(s <= 0 for s in sizes):
            raise UserError(f"--{axis}s must be positive, got {list(sizes)}")
    base = dataclasses.replace(
        cfg, warmup_steps=0, decay_lr=False, max_steps=steps, compile="false", dtype="float32"
    ).validate()
    plan = [("width", w, sized_config(base, "width", w)) for w in widths]
    plan += [("depth", d, sized_config(base, "depth", d)) for d in depths]
    dataset_dir, meta = prepare.prepare_from_config(base)
    rows = []
    for axis, size, sized in plan:
        for seed in range(base.seed, base.seed + seeds):
            per_step = measure(
                dataclasses.replace(sized, seed=seed),
                steps,
                meta["vocab_size"],
                dataset_dir,
                device,
            )
            for step, rms in enumerate(per_step, start=1):
                for layer in LAYER_TYPES:
                    rows.append(
                        {
                            "parametrization": base.parametrization,
                            "optimizer": base.optimizer,
                            "axis": axis,
                            "size": size,
                            "n_embd": sized.n_embd,
                            "n_layer": sized.n_layer,
                            "seed": seed,
                            "step": step,
                            "layer": layer,
                            "rms": rms[layer],
                        }
                    )
        if log is not None:
            log(f"[raygpt] coord-check {axis} {size}: {steps} steps x {seeds} seed(s) done")
    return rows


def mean_rms(rows: list[dict[str, Any]], axis: str, step: int, layer: str) -> dict[int, float]:
    """{size: RMS averaged over seeds} of one axis, step and layer type."""
    found: dict[int, list[float]] = {}
    for r in rows:
        if (r["axis"], r["step"], r["layer"]) == (axis, step, layer):
            found.setdefault(r["size"], []).append(r["rms"])
    return {size: sum(v) / len(v) for size, v in sorted(found.items())}


def slope(by_size: dict[int, float]) -> float:
    """The least-squares slope of log RMS against log size."""
    xs = [math.log(s) for s in by_size]
    ys = [math.log(max(v, 1e-30)) for v in by_size.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def verdicts(
    rows: list[dict[str, Any]], tolerance: float = DEFAULT_TOLERANCE, step: int | None = None
) -> list[Verdict]:
    """One Verdict per (axis, layer type) present, at `step` (default: the last)."""
    if not rows:
        return []
    parametrization = rows[0]["parametrization"]
    step = max(r["step"] for r in rows) if step is None else step
    out = []
    for axis in AXES:
        if not any(r["axis"] == axis for r in rows):
            continue
        for layer in LAYER_TYPES:
            value = slope(mean_rms(rows, axis, step, layer))
            expected = expectation(parametrization, axis, layer)
            if expected == "flat":
                passed: bool | None = abs(value) <= tolerance
            elif expected == "grows":
                passed = value > tolerance
            else:
                passed = None
            out.append(Verdict(axis, layer, value, expected, passed))
    return out


# --------------------------------------------------------------------------- files


def write_table(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """coord_check.parquet and coord_check.csv: every row."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    folder.mkdir(parents=True, exist_ok=True)
    parquet, csv = folder / "coord_check.parquet", folder / "coord_check.csv"
    pq.write_table(table, parquet)
    pacsv.write_csv(table, csv)
    return [parquet, csv]


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """RMS against size, log-log: a row of panels (one per layer type) per axis, one line
    per step, as nanoGPT-mup's coord-check figures draw it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_present = [a for a in AXES if any(r["axis"] == a for r in rows)]
    steps = sorted({r["step"] for r in rows})
    fig, grid = plt.subplots(
        len(axes_present),
        len(LAYER_TYPES),
        figsize=(3.2 * len(LAYER_TYPES), 2.9 * len(axes_present)),
        squeeze=False,
    )
    cmap = plt.get_cmap("viridis")
    for i, axis in enumerate(axes_present):
        for j, layer in enumerate(LAYER_TYPES):
            ax = grid[i][j]
            for k, step in enumerate(steps):
                by_size = mean_rms(rows, axis, step, layer)
                color = cmap(k / max(1, len(steps) - 1))
                ax.plot(list(by_size), list(by_size.values()), marker="o", ms=3, color=color,
                        label=f"step {step}")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{layer} (slope {slope(mean_rms(rows, axis, steps[-1], layer)):+.2f})")
            ax.set_xlabel("n_embd" if axis == "width" else "n_layer")
            if j == 0:
                ax.set_ylabel("activation RMS")
            ax.grid(True, which="both", alpha=0.3)
    grid[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    first = rows[0]
    fig.suptitle(f"coordinate check: {first['parametrization']}, {first['optimizer']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
