"""Learning-rate transfer across width, against direct sweeps at the target, in one run.

    python benchmarks/lr_transfer.py [--data-file ../shared/data/tinyshakespeare.txt] \
        [--experiment experiments/shakespeare_char_transfer.toml] [--parametrizations mup,sp] \
        [--proxies 32,64,128] [--target 512] [--direct 512] [--direct-seeds 2] \
        [--depths 2,4,8 --depth-target 16 --depth-width 64 [--depth-direct]] \
        [--storage-path DIR] [--json OUT] \
        [-- EXTRA SWEEP FLAGS]

For each parametrization: a transfer sweep (`raygpt.sweep --transfer n_embd=PROXIES
--target n_embd=TARGET`) fits the best learning rate at each proxy width and predicts the
target's; a direct sweep of the same grid at each --direct width finds its best lr by the
same fit (raygpt/report/transfer/fit.py). With --depths, a CompleteP transfer across depth
at --depth-width too, and with --depth-direct a direct sweep at --depth-target to check
its prediction against. Every sweep runs in this process on one Ray cluster.

The checks: under mup, the best lr at the widest proxy within a factor 2 (one grid step)
of the narrowest's; the prediction for the target within 1.5x of the direct sweep's best
there; the proxies' device-seconds at most 20% of that direct sweep's. Under sp, the
shift of the best lr across the proxies, as measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

from raygpt import results, storage
from raygpt.report.transfer import fit
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver
from raygpt.sweep import transfer

TARGETS = {"mup_widest_vs_narrowest": 2.0, "prediction_vs_direct": 1.5, "cost_fraction": 0.2}


def _rows(folder: str, file: str) -> list[dict[str, Any]]:
    store = storage.resolve(folder, check=False)
    return results.read_table(store, f"{store.root}/{file}").to_pylist()


def run_transfer(common: list[str], param: str, axis: str, target: str, name: str) -> dict:
    args = [*common, "--parametrization", param, "--transfer", axis, "--target", target]
    sweep_cfg, train_cfg = sweep_cli.configs_from_argv([*args, "--name", name])
    outcome = transfer.run(
        sweep_cfg, train_cfg, sweep_driver.run, sweep_driver.check_found_something
    )
    table = _rows(outcome["transfer_dir"], "transfer.parquet")
    key = axis.split("=")[0]
    proxies = [
        {"size": r[key], "lr": r["lr"], "low": r["low"], "high": r["high"], "edge": r["edge"]}
        | {"device_seconds": r["device_seconds"], "in_trend": r["in_trend"]}
        for r in table
        if r["kind"] == "proxy"
    ]
    (prediction,) = [r for r in table if r["kind"] == "prediction"] or [{}]
    return {
        "parametrization": param,
        "axis": key,
        "proxies": proxies,
        "prediction": {
            k: prediction.get(k)
            for k in ("lr", "low", "high", "device_seconds", "direct_device_seconds")
        },
        "lines": outcome["lines"],
    }


def run_direct(common: list[str], param: str, key: str, size: int, seeds: int) -> dict:
    args = [*common, "--parametrization", param, f"--{key.replace('_', '-')}", str(size)]
    args += ["--seeds", str(seeds), "--name", f"direct-{param}-{key}={size}"]
    summary = sweep_driver.run(*sweep_cli.configs_from_argv(args))
    trials = _rows(summary["sweep_dir"], results.TRIALS_FILE)
    ((optimizer, (lrs, losses)),) = fit.usable_trials(trials).items()
    best = fit.best_lr(lrs, losses, label=f"{optimizer} at {key}={size}")
    return {
        "parametrization": param,
        "key": key,
        "size": size,
        "lr": best.lr,
        "low": best.low,
        "high": best.high,
        "edge": best.edge,
        "trials": len(trials),
        "device_seconds": sum(t["device_seconds"] or 0.0 for t in trials),
    }


def checks(found: dict, direct: list[dict], param: str, target: int) -> dict[str, float | None]:
    """The issue's three figures for one parametrization's width transfer."""
    proxies = sorted(found["proxies"], key=lambda p: p["size"])
    out: dict[str, float | None] = {
        "widest_vs_narrowest": proxies[-1]["lr"] / proxies[0]["lr"] if proxies else None,
        "prediction_vs_direct": None,
        "cost_fraction": None,
    }
    at_target = [d for d in direct if d["parametrization"] == param and d["size"] == target]
    predicted = found["prediction"]["lr"]
    if at_target and predicted:
        out["prediction_vs_direct"] = predicted / at_target[0]["lr"]
        spent = sum(p["device_seconds"] or 0.0 for p in proxies)
        out["cost_fraction"] = spent / max(at_target[0]["device_seconds"], 1e-9)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments/shakespeare_char_transfer.toml")
    p.add_argument(
        "--data-file", default=None, help="the text to train on (default: the experiment's dataset)"
    )
    p.add_argument("--parametrizations", default="mup,sp")
    p.add_argument("--proxies", default="32,64,128")
    p.add_argument("--target", type=int, default=512)
    p.add_argument("--direct", default="512", help="widths swept directly (comma list)")
    p.add_argument("--direct-seeds", type=int, default=2)
    p.add_argument("--depths", default="", help="CompleteP proxies across depth, e.g. 2,4,8")
    p.add_argument("--depth-target", type=int, default=16)
    p.add_argument("--depth-width", type=int, default=64)
    p.add_argument("--depth-direct", action="store_true", help="sweep --depth-target directly")
    p.add_argument("--storage-path", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more sweep flags")
    a = p.parse_args(argv)
    where = a.storage_path or tempfile.mkdtemp(prefix="raygpt-transfer-bench-")
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    data = ["--data-file", a.data_file] if a.data_file else []
    common = [a.experiment, *data, "--storage-path", where, "--overwrite", *extra]
    record: dict[str, Any] = {
        "width": [], "direct": [], "depth": None, "depth_direct": [], "checks": {},
    }  # fmt: skip

    def save() -> None:
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(record, fh, indent=2)

    params = a.parametrizations.split(",")
    for param in params:
        found = run_transfer(
            common, param, f"n_embd={a.proxies}", f"n_embd={a.target}", f"transfer-{param}"
        )
        record["width"].append(found)
        save()
        for width in _ints(a.direct):
            record["direct"].append(run_direct(common, param, "n_embd", width, a.direct_seeds))
            save()
        record["checks"][param] = checks(found, record["direct"], param, a.target)
        save()
    if a.depths:
        depth_common = [*common, "--n-embd", str(a.depth_width)]
        record["depth"] = run_transfer(
            depth_common, "completep", f"n_layer={a.depths}", f"n_layer={a.depth_target}",
            "transfer-completep-depth",
        )  # fmt: skip
        save()
        if a.depth_direct:
            record["depth_direct"].append(
                run_direct(depth_common, "completep", "n_layer", a.depth_target, a.direct_seeds)
            )
            record["checks"]["completep-depth"] = checks(
                record["depth"], record["depth_direct"], "completep", a.depth_target
            )
            save()

    print(f"\n{'parametrization':<16}{'size':>8}{'best lr':>10}{'90% interval':>24}"
          f"{'device-s':>10}  kind")  # fmt: skip
    for found in [*record["width"], *([record["depth"]] if record["depth"] else [])]:
        for r in found["proxies"]:
            band = f"{fit.sci(r['low'])}..{fit.sci(r['high'])}"
            print(f"{found['parametrization']:<16}{found['axis'] + '=' + str(r['size']):>8}"
                  f"{fit.sci(r['lr']):>10}{band:>24}{r['device_seconds'] or 0:>10.0f}  proxy"
                  f"{' (edge: ' + r['edge'] + ')' if r['edge'] else ''}")  # fmt: skip
        pr = found["prediction"]
        if pr["lr"]:
            band = f"{fit.sci(pr['low'])}..{fit.sci(pr['high'])}"
            print(f"{found['parametrization']:<16}{'target':>8}{fit.sci(pr['lr']):>10}"
                  f"{band:>24}{'':>10}  prediction")  # fmt: skip
    for d in [*record["direct"], *record["depth_direct"]]:
        band = f"{fit.sci(d['low'])}..{fit.sci(d['high'])}"
        print(f"{d['parametrization']:<16}{d['key'] + '=' + str(d['size']):>8}{fit.sci(d['lr']):>10}"
              f"{band:>24}{d['device_seconds']:>10.0f}  direct sweep"
              f"{' (edge: ' + d['edge'] + ')' if d['edge'] else ''}")  # fmt: skip
    print()
    for param, c in record["checks"].items():
        shift = c["widest_vs_narrowest"]
        parts = [f"best lr widest/narrowest proxy {shift:.2f}x" if shift else "no proxies"]
        if param in ("mup", "completep-depth") and shift:
            parts[-1] += f" (target within {TARGETS['mup_widest_vs_narrowest']:g}x)"
        if c["prediction_vs_direct"] is not None:
            parts.append(f"prediction/direct best {c['prediction_vs_direct']:.2f}x "
                         f"(target within {TARGETS['prediction_vs_direct']:g}x)")  # fmt: skip
            parts.append(f"proxies' cost {c['cost_fraction']:.1%} of the direct sweep's "
                         f"(target <= {TARGETS['cost_fraction']:.0%})")  # fmt: skip
        print(f"{param}: " + "; ".join(parts))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
