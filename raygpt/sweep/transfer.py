"""`python -m raygpt.sweep EXP.toml --transfer n_embd=64,128,256 --target n_embd=768`:
sweep small proxies, predict the target's learning rate, and say what it cost.

Each proxy size (raygpt/report/transfer/plan.py makes the plan) is a normal sweep with the
experiment's search (grid or Optuna over learning rate per optimizer, its
`--search-space` keys, its `--seeds`), run by the sweep driver one after another on
the one Ray cluster into `<storage>/<name>/proxies/<size>/`. The driver is handed in
(`run_sweep`), so that nothing here trains: one training loop serves every sweep, and
the unit tests hand in their own. Then, per optimizer, each size's best lr and the
trend across sizes give the target's lr with its 90% interval (report/transfer.py),
written to `<name>/transfer.parquet` and `<name>/transfer.png` with a summary line.

`--confirm` trains the target at the prediction and at 2x and 1/2 of it: a 3-point
grid, FIFO, through the same driver into `<name>/confirm-target/`.

The transfer's folder is a sweep folder to run_folder (its sweep.json is the record,
so --overwrite removes it and --resume continues it), held by one lease while it
runs; each proxy holds its own. transfer.json keeps which sweeps finished: a resumed
transfer skips them, resumes the one that was cut short, and runs the rest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from raygpt import results, run_folder, storage
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.redact import redact_config
from raygpt.report.transfer import analysis
from raygpt.report.transfer import outputs as transfer_outputs
from raygpt.report.transfer import plan as transfer_plan
from raygpt.storage import Storage
from raygpt.sweep.config import SweepConfig
from raygpt.train import preflight

STATE_FILE = "transfer.json"
RunSweep = Callable[[SweepConfig, TrainConfig], dict[str, Any]]


def sub_uri(store: Storage, *parts: str) -> str:
    """The --storage-path of a folder inside `store` (the URI keeps its query: an
    object store's endpoint and options)."""
    base, sep, query = store.uri.partition("?")
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    return f"{base.rstrip('/')}/{tail}{sep}{query}"


def transfer_name(sweep: SweepConfig) -> str:
    return sweep.name or f"transfer-{'-'.join(sweep.optimizers)}"


def proxy_configs(
    sweep: SweepConfig, train: TrainConfig, store: Storage, name: str
) -> list[tuple[str, dict[str, int], SweepConfig, TrainConfig]]:
    """Each proxy's (folder name, size, sweep, training config): the experiment's own
    sweep at that size, named by its size, in `<name>/proxies/`."""
    out = []
    for folder, size in sweep.proxy_sizes(train):
        proxy_train = TrainConfig.from_dict(train.to_dict() | size).validate()
        proxy_sweep = dataclasses.replace(
            sweep,
            name=folder,
            storage_path=sub_uri(store, name, transfer_plan.PROXIES_DIR),
            grace_steps=None,  # FIFO without rungs: no rung cooldowns to train
            transfer=[],
            target=None,
            confirm=False,
            resume=False,
            overwrite=False,
        ).validate(proxy_train)
        out.append((folder, size, proxy_sweep, proxy_train))
    return out


def confirm_configs(
    sweep: SweepConfig, train: TrainConfig, store: Storage, name: str, predictions: dict[str, float]
) -> tuple[SweepConfig, TrainConfig]:
    """The target trained at each optimizer's prediction x 1/2, 1, 2: grid_points=3 on
    the range prediction/2..2 x prediction is exactly those three."""
    target_train = TrainConfig.from_dict(train.to_dict() | sweep.transfer_target()).validate()
    confirm = dataclasses.replace(
        sweep,
        name=transfer_plan.CONFIRM_DIR,
        storage_path=sub_uri(store, name),
        optimizers=list(predictions),
        search="grid",
        scheduler="fifo",
        grid_points=len(transfer_plan.CONFIRM_MULTIPLES),
        grace_steps=None,
        lr_range=[f"{opt}={lr / 2!r}:{lr * 2!r}" for opt, lr in predictions.items()],
        search_space=[],
        confirm_top=0,
        transfer=[],
        target=None,
        confirm=False,
        resume=False,
        overwrite=False,
    ).validate(target_train)
    return confirm, target_train


def _read_state(store: Storage, path: str) -> dict[str, Any]:
    try:
        value = json.loads(store.read_bytes(f"{path}/{STATE_FILE}"))
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class _Sweeps:
    """Runs the transfer's sweeps in its folder, keeping transfer.json's list of those
    finished: a resumed transfer skips them and resumes the one cut short."""

    def __init__(
        self,
        store: Storage,
        path: str,
        resume: bool,
        run_sweep: RunSweep,
        check: Callable[[dict[str, Any]], None] | None,
    ):
        self.store, self.path = store, path
        self.run_sweep, self.check = run_sweep, check
        self.state = _read_state(store, path) if resume else {}
        self.state.setdefault("finished", [])
        self.save()

    def save(self) -> None:
        results.write_json(self.store, f"{self.path}/{STATE_FILE}", self.state)

    def run(self, folder: str, sweep: SweepConfig, train: TrainConfig) -> None:
        """One sweep into `<transfer>/<folder>`, unless an earlier run finished it."""
        if folder in self.state["finished"]:
            print(f"[transfer] {folder}: finished in an earlier run; skipped", flush=True)
            return
        path = f"{self.path}/{folder}"
        how = "new"
        if self.store.list_dir(path):
            from ray import tune

            # No Tune state: it stopped before its trials began, and starts over.
            restorable = tune.Tuner.can_restore(path, storage_filesystem=self.store.fs)
            how = "resume" if restorable else "overwrite"
        print(f"[transfer] {folder}: {'resuming' if how == 'resume' else 'sweeping'}", flush=True)
        summary = self.run_sweep(
            dataclasses.replace(sweep, resume=how == "resume", overwrite=how == "overwrite"),
            train,
        )
        if self.check is not None:  # a sweep none of whose trials finished stops the transfer
            self.check(summary)
        self.state["finished"].append(folder)
        self.save()

    def forget(self, folder: str) -> None:
        self.state["finished"] = [f for f in self.state["finished"] if f != folder]


def run(
    sweep: SweepConfig,
    train: TrainConfig,
    run_sweep: RunSweep,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a transfer: the proxies' sweeps (each through `run_sweep`, its
    summary then through `check`), the fit, --confirm; returns what it found (lines,
    predictions, files written)."""
    name = transfer_name(sweep)
    store = storage.resolve(sweep.storage_path)
    path = store.path(name)
    where = store.display(path)
    proxies = proxy_configs(sweep, train, store, name)
    axes, target = sweep.transfer_axes(), sweep.transfer_target()
    with run_folder.claim(store, name, sweep.resume, sweep.overwrite, "sweep"):
        run_folder.prepare_run_dir(store, path, sweep.resume, sweep.overwrite, kind="sweep")
        metadata = {
            "sweep": dict(vars(sweep)) | {"name": name},
            "config": train.to_dict(),
            "transfer": {"proxies": {f: s for f, s, _, _ in proxies}},
        }
        record = f"{path}/{results.SWEEP_FILE}"
        preflight.write_record(store, record, redact_config(metadata), sweep.resume)
        sweeps = _Sweeps(store, path, sweep.resume, run_sweep, check)
        print(
            f"[transfer] {name}: {len(proxies)} proxy sweep(s) "
            f"({'; '.join(f for f, _, _, _ in proxies)}) under {train.parametrization}, "
            f"for {transfer_plan.size_text(target)} -> {where}",
            flush=True,
        )
        for folder, _, proxy_sweep, proxy_train in proxies:
            sweeps.run(f"{transfer_plan.PROXIES_DIR}/{folder}", proxy_sweep, proxy_train)
        transfer_store = store.at(path)
        found = analysis.analyse(
            analysis.read_proxies(transfer_store, [(f, s) for f, s, _, _ in proxies]),
            transfer_plan.target_size(vars(train), axes, target),
            [k for k, _ in axes],
            sweep.optimizers,
        )
        if sweep.confirm:
            _confirm(sweep, train, store, name, found, sweeps)
        written = transfer_outputs.write_outputs(transfer_store, found, name=name)
        text = analysis.lines(found, sweep.gpu_hour_price)
        sweeps.state["predictions"] = found.predictions()
        sweeps.save()
    print("\n".join(["", *text, ""]), flush=True)
    for file in written:
        print(f"[transfer] wrote {file}", flush=True)
    return {
        "transfer_dir": where,
        "lines": text,
        "predictions": found.predictions(),
        "written": [str(w) for w in written],
        "confirmed": {o: t.confirmed for o, t in found.optimizers.items() if t.confirm},
    }


def _confirm(
    sweep: SweepConfig,
    train: TrainConfig,
    store: Storage,
    name: str,
    found: analysis.Transfer,
    sweeps: _Sweeps,
) -> None:
    """Train the target at each prediction x 1/2, 1, 2 and add what it found to `found`."""
    predictions = found.predictions()
    if not predictions:
        print("[transfer] no prediction to confirm", flush=True)
        return
    confirm_sweep, target_train = confirm_configs(sweep, train, store, name, predictions)
    if sweeps.state.get("confirmed") != predictions:  # a new prediction trains anew
        sweeps.forget(transfer_plan.CONFIRM_DIR)
    sweeps.state["confirmed"] = predictions
    sweeps.run(transfer_plan.CONFIRM_DIR, confirm_sweep, target_train)
    rows, _ = analysis.read_sweep(store, store.path(name, transfer_plan.CONFIRM_DIR))
    for opt, lr in predictions.items():
        found.optimizers[opt].confirm = analysis.confirm_points(rows, lr, opt)


def check_predicted(outcome: dict[str, Any]) -> None:
    """A transfer that predicts for no optimizer has no answer: say so, and fail."""
    if outcome["predictions"]:
        return
    first = next((line for line in outcome["lines"] if "no prediction" in line), "no optimizer")
    raise UserError(f"the transfer predicts nothing: {first}; see {outcome['transfer_dir']}")
