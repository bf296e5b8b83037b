"""TrainConfig: everything one run trains with, validated once; loaded from TOML and flags.

Configuration is data, never code: an experiment is a flat TOML file whose keys
are the fields of `TrainConfig` (plus an optional `[sweep]` table for
`raygpt.sweep`), and every key is also a command-line flag (`learning_rate` is
`--learning-rate`). Flags override the file; the file overrides the defaults.
Every check happens here, at the edge, so a bad value is one clear line before
Ray starts, never a traceback from inside a worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raygpt.config.choices import (
    DTYPES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PLACEMENT_STRATEGIES,
    TRI_STATE,
    UPLOAD_MODES,
    check_bpe_vocab_size,
    check_parametrization,
    check_rung_cooldown,
)
from raygpt.config.io import add_dataclass_flags, build_dataclass, merge, read_toml
from raygpt.errors import UserError
from raygpt.run_folder import check_name

STORAGE_ENV = "RAYGPT_STORAGE_PATH"


def default_storage_path() -> str:
    """$RAYGPT_STORAGE_PATH (the one place a cluster names its shared storage), else
    ~/ray_results."""
    return os.environ.get(STORAGE_ENV) or "~/ray_results"


@dataclass
class TrainConfig:
    """Everything one training run needs; also the per-trial config of a sweep."""

    # --- run: where results go and how many workers run it
    name: str | None = None  # run folder under storage_path; default derived from the config
    # A local path, an NFS mount, or s3://BUCKET/PATH / gs://BUCKET/PATH (an S3-compatible
    # server: s3://BUCKET/PATH?endpoint_override=HOST:PORT). Default: $RAYGPT_STORAGE_PATH,
    # which the cluster files set, else ~/ray_results.
    storage_path: str = dataclasses.field(default_factory=default_storage_path)
    num_workers: int = 1  # DDP ranks, one Ray Train worker each
    # None: what the node can give, cores / workers on it (a sweep's trials: 1 each), so
    # torch uses every core; Ray sets each worker's OMP_NUM_THREADS to this.
    cpus_per_worker: float | None = None
    use_gpu: str = "auto"  # auto: one GPU per worker when the cluster has GPUs
    # How workers spread over nodes: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD.
    placement_strategy: str = "PACK"
    # Run the one worker inside this process (Ray Train's local mode): no Ray cluster and
    # no worker process to start. auto: when the run has one worker and no cluster is
    # running or named (a laptop run). A raised error then restarts from the latest
    # checkpoint as a worker group would; a killed process needs --resume.
    in_process: str = "auto"
    # Default: the running cluster (RAY_ADDRESS, or the one `ray start` runs here), else a
    # private one; "local" always starts a private one; or "host:port" / "auto".
    address: str | None = None
    resume: bool = False  # continue the named run from its latest checkpoint
    overwrite: bool = False  # replace an existing run of the same name
    max_failures: int = 1  # worker-group restarts from the latest checkpoint
    # Seconds a worker group may wait for free CPUs/GPUs before the run fails with one
    # line naming what it asked for and what is free (0: wait forever, as a run queued
    # on a busy team cluster may want). Ray Train on its own would retry forever.
    start_timeout_s: float = 600.0

    # --- data
    dataset: str = "pydocs_char"
    # Any local UTF-8 text, or JSONL (.jsonl, .jsonl.gz) with a "text" field per line (one
    # document each); overrides dataset.
    data_file: str | None = None
    # char | gpt2 | bpe (for data_file, or bpe for a registered dataset): bpe trains a
    # byte-level BPE of vocab_size tokens on the text, stored with the prepared dataset.
    tokenizer: str = "char"
    vocab_size: int | None = None  # bpe only: tokens, >= 257 (the 256 bytes + end-of-text)
    data_dir: str | None = None  # cache of prepared datasets
    # A prepared dataset used as it is: a folder with manifest.json (python -m raygpt.data
    # prepare), llm.c/modded-nanogpt shards, or nanoGPT's train.bin/val.bin; a local path
    # or s3://, gs://. Overrides dataset and data_file.
    dataset_dir: str | None = None

    # --- model (GPT-2 architecture)
    # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face GPT-2 directory |
    # a raygpt checkpoint (a checkpoint_* folder, or a run folder or run name: its latest),
    # local or s3://, gs://. Pretrained weights bring their own shape: n_layer, n_head,
    # n_embd and bias are ignored, block_size may only crop.
    init_from: str = "scratch"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False
    # How init, forward multipliers and per-group lr / weight decay / eps scale with width
    # and depth (docs/parametrization.md): sp (nanoGPT's, unchanged), mup (Yang et al.
    # 2022) or completep (mup plus 1/depth residual branches, Dey et al. 2025).
    parametrization: str = "sp"
    # The proxy the multipliers are relative to: width multiplier n_embd / mup_base_width,
    # depth multiplier n_layer / mup_base_depth (completep only). nanoGPT-mup's defaults.
    mup_base_width: int = 256
    mup_base_depth: int = 2
    # Tunable constants (searchable): embeddings x input_alpha, logits x output_alpha /
    # width multiplier, attention scores x attn_alpha / head size. mup and completep only.
    mup_input_alpha: float = 1.0
    mup_output_alpha: float = 1.0
    mup_attn_alpha: float = 1.0

    # --- optimizer and learning-rate schedule
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    min_lr: float | None = None  # default: learning_rate / 10 (Chinchilla)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    momentum: float = 0.9  # for optimizer = momentum
    nesterov: bool = False
    # muon: learning_rate is the hidden matrices' (Newton-Schulz) rate; embeddings, head
    # and 1-D parameters use AdamW at learning_rate x muon_adamw_lr_scale.
    muon_momentum: float = 0.95  # modded-nanogpt's; Nesterov is always on
    muon_adamw_lr_scale: float = 0.1
    warmup_steps: int = 100
    # cosine: nanoGPT's decay from the peak to min_lr at lr_decay_steps. wsd: warmup, the
    # peak rate, then a 1-sqrt decay to min_lr over the last decay_fraction of
    # lr_decay_steps. Schedule-free optimizers get warmup then the peak under either.
    lr_schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd only
    decay_lr: bool = True  # false: constant learning rate after warmup
    lr_decay_steps: int | None = None  # default: max_steps
    grad_clip: float = 1.0  # 0 disables clipping; the pre-clip norm is always reported

    # --- batch and length
    # Micro-batch, sequences per worker per forward pass. With tokens_per_step it is an
    # upper bound: the largest micro-batch <= batch_size that divides the step among the
    # workers (micro_batch_size), so any worker count dividing the step's sequences works.
    batch_size: int = 12
    tokens_per_step: int | None = None  # global batch; default batch_size*block_size*workers
    max_steps: int = 2000

    # --- evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    # Also estimate the train split's loss at each eval (as nanoGPT does); a sweep's
    # trials can skip it: it doubles the eval cost and ranks nothing.
    eval_train: bool = True
    # Rung-time cooldown (rung_cooldown.py): at the steps in cooldown_at (a sweep sets
    # them to ASHA's rungs) also evaluate a copy whose lr decays to min_lr over this
    # fraction of the steps so far; the scheduler ranks trials on that value. 0: off.
    rung_cooldown: float = 0.0
    cooldown_at: list[int] = dataclasses.field(default_factory=list)
    # Evaluate the initial model (init_from) once, as a step-0 row, and stop: no training.
    eval_only: bool = False
    log_interval: int = 10
    checkpoint_interval: int | None = None  # steps between checkpoints; default: eval_interval
    checkpoint_upload: str = "async"  # async: ranks go on training while Ray uploads; or sync
    keep_checkpoints: int = 2
    divergence_factor: float = 3.0  # stop when loss > factor x first loss (0 disables)

    # --- what rank 0 shows and sends during training
    sample_every: int = 0  # steps between text samples, printed and in TensorBoard; 0: off
    sample_tokens: int = 200  # new tokens per sample
    sample_prompt: str = "\n"  # what samples continue, in the dataset's tokenizer
    hellaswag_every: int = 0  # steps between HellaSwag acc_norm scores of the model; 0: off
    hellaswag_limit: int = 200  # the first N val examples, per score
    hellaswag_file: str | None = None  # a local JSONL in HellaSwag's format, not the download
    wandb: str | None = None  # a W&B project: every step row goes there (raygpt[wandb])
    # An MLflow tracking URI (a server, file:///PATH or a folder): every step row goes
    # there (raygpt[mlflow]); the experiment is $MLFLOW_EXPERIMENT_NAME, else "raygpt".
    mlflow: str | None = None

    # --- system
    seed: int = 1337
    dtype: str = "auto"  # auto: bfloat16 on CUDA if supported, else float16; float32 on CPU
    compile: str = "auto"  # auto: on for CUDA, off for CPU
    peak_tflops: float | None = None  # per-device peak for MFU where the table has none

    @property
    def resolved_min_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    @property
    def resolved_lr_decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    @property
    def resolved_checkpoint_interval(self) -> int:
        if self.checkpoint_interval is None:
            return self.eval_interval
        return self.checkpoint_interval

    @property
    def resolved_tokens_per_step(self) -> int:
        if self.tokens_per_step is None:
            return self.batch_size * self.block_size * self.num_workers
        return self.tokens_per_step

    def micro_batch_size(self, world_size: int | None = None) -> int:
        """The micro-batch of `world_size` workers: the largest b <= batch_size for which
        tokens_per_step = b x block_size x world_size x grad_accum (batch_size itself
        whenever it divides, as every config did before this rule)."""
        world_size = self.num_workers if world_size is None else world_size
        per_rank = self.block_size * world_size
        total = self.resolved_tokens_per_step
        if total % per_rank:
            raise UserError(
                f"tokens_per_step={total} is not a multiple of block_size x num_workers = "
                f"{self.block_size} x {world_size} = {per_rank}; pick a multiple of {per_rank}"
            )
        sequences = total // per_rank  # per worker per step
        return max(b for b in range(1, min(self.batch_size, sequences) + 1) if sequences % b == 0)

    def grad_accum_steps(self, world_size: int | None = None) -> int:
        """Micro-steps per optimizer step, so that every step sees tokens_per_step tokens."""
        world_size = self.num_workers if world_size is None else world_size
        per_pass = self.micro_batch_size(world_size) * self.block_size * world_size
        return self.resolved_tokens_per_step // per_pass

    def default_name(self) -> str:
        if self.dataset_dir is not None:
            data = self.dataset_dir.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        else:
            data = self.dataset if self.data_file is None else Path(self.data_file).stem
        return f"{data}-{self.optimizer}-lr{self.learning_rate:g}"

    def validate(self) -> TrainConfig:
        """Check every value; raise UserError naming the first bad one."""
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        check_parametrization(self.parametrization, self.optimizer)
        _check_positive(self, "mup_base_width", "mup_base_depth")
        _check_positive(self, "mup_input_alpha", "mup_output_alpha", "mup_attn_alpha")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        if not 0 <= self.decay_fraction <= 1:
            raise UserError(f"decay_fraction={self.decay_fraction} must be between 0 and 1")
        _check_positive(self, "learning_rate", "num_workers", "n_layer", "muon_adamw_lr_scale")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise UserError(f"cpus_per_worker={self.cpus_per_worker} must be > 0")
        _check_positive(self, "n_head", "n_embd", "block_size", "batch_size", "max_steps")
        _check_positive(self, "eval_interval", "eval_iters", "log_interval", "keep_checkpoints")
        check_rung_cooldown(self.rung_cooldown)
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise UserError(
                f"min_lr={self.min_lr} must be between 0 and learning_rate={self.learning_rate}"
            )
        if not self.start_timeout_s >= 0:
            raise UserError(
                f"start_timeout_s={self.start_timeout_s} must be >= 0 (0: wait for free "
                "resources forever)"
            )
        for key in ("warmup_steps", "weight_decay", "grad_clip", "divergence_factor", "momentum"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}={getattr(self, key)} must be >= 0")
        for key in ("max_failures",):
            if getattr(self, key) < -1:
                raise UserError(f"{key}={getattr(self, key)} must be >= 0 (or -1: unlimited)")
        for key in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)} must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "attention splits n_embd evenly across heads"
            )
        if self.tokenizer not in ("char", "gpt2", "bpe"):
            raise UserError(f"unknown tokenizer {self.tokenizer!r}; choose char, gpt2 or bpe")
        if self.tokenizer == "bpe" and self.dataset_dir is None:
            check_bpe_vocab_size(self.vocab_size)
        elif self.vocab_size is not None and self.tokenizer != "bpe":
            raise UserError(
                f"vocab_size={self.vocab_size} is for --tokenizer bpe only; char and gpt2 "
                "vocabularies are fixed by the text or the encoding"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        for key in ("use_gpu", "compile", "in_process"):
            if getattr(self, key) not in TRI_STATE:
                raise UserError(f"{key}={getattr(self, key)!r} must be auto, true or false")
        if self.checkpoint_interval is not None and self.checkpoint_interval <= 0:
            raise UserError(f"checkpoint_interval={self.checkpoint_interval} must be > 0")
        if self.checkpoint_upload not in UPLOAD_MODES:
            raise UserError(
                f"checkpoint_upload={self.checkpoint_upload!r} must be one of "
                f"{', '.join(UPLOAD_MODES)}"
            )
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise UserError(
                f"placement_strategy={self.placement_strategy!r} must be one of "
                f"{', '.join(PLACEMENT_STRATEGIES)}"
            )
        if self.lr_decay_steps is not None and self.lr_decay_steps <= 0:
            raise UserError(f"lr_decay_steps={self.lr_decay_steps} must be > 0")
        if self.tokens_per_step is not None and self.tokens_per_step <= 0:
            raise UserError(f"tokens_per_step={self.tokens_per_step} must be > 0")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise UserError(f"peak_tflops={self.peak_tflops} must be > 0")
        if self.data_file is not None:
            if not Path(self.data_file).expanduser().is_file():
                raise UserError(
                    f"data file {self.data_file} does not exist; give a path to a UTF-8 text file"
                )
            # Absolute, because Ray workers and Tune trials run in other directories.
            self.data_file = str(Path(self.data_file).expanduser().resolve())
        if self.dataset_dir is not None:
            if self.data_file is not None:
                raise UserError("give either --dataset-dir or --data-file, not both")
            if "://" not in self.dataset_dir:
                folder = Path(self.dataset_dir).expanduser()
                if not folder.is_dir():
                    raise UserError(
                        f"dataset dir {self.dataset_dir} is not a folder; give one holding "
                        "manifest.json, llm.c shards or nanoGPT's train.bin and val.bin"
                    )
                self.dataset_dir = str(folder.resolve())  # workers run in other directories
        if self.eval_only and self.resume:
            raise UserError(
                "--eval-only evaluates the initial model of a new run; to score a checkpoint "
                "use --init-from CHECKPOINT --eval-only (or python -m raygpt.eval)"
            )
        for key in ("sample_every", "hellaswag_every"):
            if getattr(self, key) < 0:
                raise UserError(f"{key}={getattr(self, key)} must be >= 0 (0: off)")
        _check_positive(self, "sample_tokens", "hellaswag_limit")
        if self.hellaswag_file is not None:
            path = Path(self.hellaswag_file).expanduser()
            if not path.is_file():
                raise UserError(
                    f"hellaswag file {self.hellaswag_file} does not exist; give a JSONL file "
                    "in HellaSwag's format, or leave it out to download the val split"
                )
            self.hellaswag_file = str(path.resolve())  # workers run in other directories
        if self.wandb is not None and not re.fullmatch(r"[^/\\#?%:\s]{1,128}", self.wandb):
            raise UserError(
                f"wandb={self.wandb!r} is not a W&B project name (1 to 128 characters, none "
                "of / \\ # ? % : or spaces)"
            )
        if self.mlflow is not None:
            if not self.mlflow.strip():
                raise UserError("mlflow is empty; give a tracking URI or a folder")
            if "://" not in self.mlflow and not self.mlflow.startswith("databricks"):
                # A folder: MLflow's file store, absolute because workers run elsewhere.
                self.mlflow = Path(self.mlflow).expanduser().resolve().as_uri()
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; choose one")
        if self.name is not None:
            check_name(self.name, "run name")
        # loop.py and bench.py run cfg.batch_size: make it the derived micro-batch.
        self.batch_size = self.micro_batch_size()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return build_dataclass(cls, values, "config")


def _check_positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if not value > 0:
            raise UserError(f"{key}={value} must be > 0")


# Keys whose --help says more than their default.
FLAG_HELP = {
    "parametrization": (
        "sp | mup | completep (docs/parametrization.md). mup: Yang et al. 2022's rules for "
        "Adam-type optimizers and SGD/momentum; for lion, adamw_schedulefree and adagrad "
        "the Adam rules and for muon the spectral condition's (arXiv 2310.17813) are "
        "derived, not validated by a published transfer study. completep: mup plus "
        "1/depth residual branches, for Adam-type optimizers only (sgd, momentum and muon "
        "are refused: no settled rule)"
    ),
}


def add_train_flags(
    parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), title: str | None = None
) -> None:
    """One flag per TrainConfig key (io.add_dataclass_flags), with FLAG_HELP."""
    add_dataclass_flags(parser, TrainConfig, exclude=exclude, title=title, help_texts=FLAG_HELP)


def load_train_config(
    experiment: str | None, flag_values: dict[str, Any], ignore_tables: tuple[str, ...] = ()
) -> TrainConfig:
    """TrainConfig from an optional experiment file and parsed flags, validated."""
    file_values: dict[str, Any] = {}
    source = "defaults"
    if experiment is not None:
        file_values = read_toml(experiment)
        source = str(experiment)
        for table in ("sweep", *ignore_tables):
            file_values.pop(table, None)
    cfg = merge(TrainConfig, file_values, flag_values, source)
    return cfg.validate()
