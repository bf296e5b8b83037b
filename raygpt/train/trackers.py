"""Experiment trackers, Weights & Biases (`wandb`: a project) and MLflow (`mlflow`: a
tracking URI), beside the Parquet parts and TensorBoard files every run writes.

- A `raygpt.train` run: rank 0 opens one tracker run per training attempt and logs
  every step row where it writes the rows' Parquet part (`RunTrackers`, in loop.py).
- A sweep: the driver's Tune logger callbacks (`tune_callbacks`) open one tracker run
  per trial, with its hyperparameters, and log each of its reports (evaluations and
  checkpoints). A trial's own loop then logs nothing: that would be a second run per
  trial.

Ray's integrations do the setup (`setup_wandb`, `setup_mlflow`, the callbacks). Both
setups work in Ray Train V2 and in its local mode, but setup_wandb takes the trial and
the rank from Train V1's session, which V2 never sets: the run's name is passed here,
and only rank 0 calls it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow as pa

from raygpt import results
from raygpt.errors import UserError, first_line
from raygpt.redact import MASK, redact, redact_config

# The numbers of a step row worth a curve: everything numeric but the step itself (the
# x axis) and the configured learning rate (a parameter, not a metric).
METRIC_COLUMNS = tuple(
    f.name
    for f in results.STEP_SCHEMA
    if (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))
    and f.name not in ("step", "learning_rate")
)
# The MLflow experiment of single runs (a sweep's is the sweep); MLflow's own variable
# picks another.
DEFAULT_MLFLOW_EXPERIMENT = "raygpt"


def check_installed(cfg: Any) -> None:
    """Before Ray starts: each tracker asked for has its package. find_spec, not an import:
    wandb and mlflow take seconds to import, and the loop imports them anyway."""
    for key in ("wandb", "mlflow"):
        if getattr(cfg, key) is not None and importlib.util.find_spec(key) is None:
            raise UserError(f"--{key} needs the {key} package: pip install 'raygpt[{key}]'")


# What MLflow's client sends, read from the same variables (mlflow.environment_variables).
_MLFLOW_USER, _MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
_MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"
# Auth the check cannot reproduce (a plugin, AWS SigV4): the run's own client decides.
_MLFLOW_OTHER_AUTH = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4")
MLFLOW_CHECK_TIMEOUT_S = 10.0


def _split_userinfo(uri: str) -> tuple[str, str, str]:
    """The URI without its `user:password@`, and the user and password it held ("" for
    none): what both the check and the run's MLflow client are given. A URI without a
    password leaves the environment's credentials to the client."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, "", ""
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return bare, unquote(parts.username or ""), unquote(parts.password or "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would resend the credentials to wherever a redirect points: the check asks
    # only the URL given, and takes a redirect as an answer that let it in.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def check_mlflow_server(uri: str) -> None:
    """Before anything is written: an http(s) --mlflow server answers and takes the
    credentials the run will send. MLflow's client would find out only inside the loop,
    after the run folder exists, and retries an unreachable server for minutes.

    One GET of the REST API's experiment lookup, with MLflow's own credentials (the
    URI's user:password, else MLFLOW_TRACKING_USERNAME / _PASSWORD, else
    MLFLOW_TRACKING_TOKEN) and TLS settings. 401 and 403 are refusals; any other answer
    (a 404 for an experiment not yet made) is a server that let the request in."""
    import base64
    import json
    import ssl
    from urllib.parse import quote

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or any(os.environ.get(k) for k in _MLFLOW_OTHER_AUTH):
        return
    shown = redact(uri)
    bare, user, password = _split_userinfo(uri)
    if not password:  # as mlflow_environment: the client then sends the environment's
        user, password = os.environ.get(_MLFLOW_USER, ""), os.environ.get(_MLFLOW_PASSWORD, "")
    base = bare.rstrip("/")
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_MLFLOW_EXPERIMENT
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(experiment)}"
    )
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    elif os.environ.get(_MLFLOW_TOKEN):
        request.add_header("Authorization", f"Bearer {os.environ[_MLFLOW_TOKEN]}")
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context(
            cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
        )
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
            context.load_cert_chain(os.environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"])
    handlers = [_NoRedirect()] + ([urllib.request.HTTPSHandler(context=context)] if context else [])

    def hidden(text: str) -> str:
        lines = redact(text).strip().splitlines()
        line = lines[0] if lines else ""
        return line.replace(password, MASK) if password else line

    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=MLFLOW_CHECK_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):  # a 404 for an experiment not yet made, a redirect
            return
        said = err.read(2000).decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            body = json.loads(said)
            said = ": ".join(str(body[k]) for k in ("error_code", "message") if body.get(k))
        raise UserError(
            f"--mlflow {shown}: the server refused the credentials (HTTP {err.code} "
            f"{hidden(said) or err.reason}); set the user and password in {_MLFLOW_USER} and "
            f"{_MLFLOW_PASSWORD} (or {_MLFLOW_TOKEN}) or in the URI"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        said = hidden(str(reason)) or type(reason).__name__
        raise UserError(
            f"--mlflow {shown}: cannot reach the tracking server ({said}); check the URI and "
            "that the server is running"
        ) from None


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(row[k]) for k in METRIC_COLUMNS if row.get(k) is not None}


class RunTrackers:
    """The tracker runs of one training attempt, open on rank 0."""

    def __init__(self) -> None:
        self.wandb_run: Any = None
        self.mlflow: Any = None  # the mlflow module, with this attempt's run active
        self.mlflow_run_id: str | None = None

    @classmethod
    def open(cls, cfg: Any, name: str, run_info: dict[str, Any]) -> RunTrackers | None:
        """None when no tracker is asked for, or in a sweep trial (the driver logs those)."""
        if run_info.get("trial_id") or (cfg.wandb is None and cfg.mlflow is None):
            return None
        # Parameters are for people: the --mlflow URI's password stays out of them.
        params = redact_config({**cfg.to_dict(), "name": name})
        trackers = cls()
        try:
            if cfg.wandb is not None:
                trackers.wandb_run = _open_wandb(cfg.wandb, name, params)
            if cfg.mlflow is not None:
                trackers.mlflow, trackers.mlflow_run_id = _open_mlflow(cfg.mlflow, name, params)
        except BaseException:
            trackers.close(failed=True)
            raise
        return trackers

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        """Every row's metrics at its step (rows: one report's, in step order)."""
        if not rows:
            return
        if self.wandb_run is not None:
            for row in rows:
                self.wandb_run.log(metrics_of(row), step=int(row["step"]))
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [
                Metric(key, value, now, int(row["step"]))
                for row in rows
                for key, value in metrics_of(row).items()
            ]
            # One request per report, not one per value (the client splits big batches).
            self.mlflow.MlflowClient().log_batch(self.mlflow_run_id, metrics=batch)

    def close(self, failed: bool) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.mlflow = None


def _open_wandb(project: str, name: str, params: dict[str, Any]) -> Any:
    from ray.air.integrations.wandb import setup_wandb

    # W&B records the command line with the run (read from sys.argv as it starts): the
    # --mlflow URI's password is masked there too, for as long as the run starts.
    argv = sys.argv
    sys.argv = [redact(arg) for arg in argv]
    try:
        # resume=None: Ray's default (True) with no run id would let wandb pick up
        # whatever run its folder last resumed. Each attempt is a run of its own.
        return setup_wandb(config=params, project=project, name=name, resume=None)
    except Exception as err:  # credentials, network, a bad project: W&B's own errors
        raise UserError(
            f"--wandb {project}: W&B could not start a run ({redact(first_line(err, with_type=True))}); run "
            "`wandb login` or set WANDB_API_KEY (WANDB_MODE=offline logs to local files)"
        ) from None
    finally:
        sys.argv = argv


def _open_mlflow(uri: str, name: str, params: dict[str, Any]) -> tuple[Any, str]:
    tracking_uri = mlflow_environment(uri)
    from ray.air.integrations.mlflow import setup_mlflow

    try:
        mlflow = setup_mlflow(
            tracking_uri=tracking_uri,
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_MLFLOW_EXPERIMENT,
            run_name=name,
            create_experiment_if_not_exists=True,
            tags={"raygpt.run": name},
            rank_zero_only=False,  # only rank 0 gets here
        )
        # One batch, where setup_mlflow(config=...) makes one request per key.
        mlflow.log_params({k: str(v) for k, v in params.items()})
    except Exception as err:  # an unreachable server, a refused store: MLflow's own errors
        raise UserError(
            f"--mlflow {redact(uri)}: {redact(first_line(err, with_type=True))}"
        ) from None
    return mlflow, mlflow.active_run().info.run_id


def mlflow_environment(uri: str) -> str:
    """Ready the process that logs (a worker, or the sweep driver) for the --mlflow `uri`;
    the tracking URI to give MLflow.

    - MLflow 3 refuses a file:// tracking store unless told otherwise; naming one with
      --mlflow is telling it.
    - A `user:password@` moves to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
      which MLflow sends as the same HTTP Basic credentials, and the URI it gets has
      none: MLflow prints each run's link from that URI, and a sweep's Tune state
      (tuner.pkl, in the sweep folder) pickles it with the MLflow callback.
    - A URI that still holds a secret (a ?token=): MLflow prints no run links.
    """
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    bare, user, password = _split_userinfo(uri)
    if password:
        os.environ[_MLFLOW_USER] = user
        os.environ[_MLFLOW_PASSWORD] = password
        uri = bare
    if redact(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return uri


def tune_callbacks(train: Any, sweep_name: str) -> list[Any]:
    """Ray Tune logger callbacks for a sweep's `RunConfig(callbacks=...)`: per trial, one
    W&B run (project `train.wandb`, grouped by the sweep's name) and one MLflow run (in an
    experiment named after the sweep), each with the trial's hyperparameters and every
    report it makes. Empty when neither tracker is asked for."""
    callbacks: list[Any] = []
    if train.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=train.wandb, group=sweep_name))
    if train.mlflow is not None:
        tracking_uri = mlflow_environment(train.mlflow)
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=tracking_uri,
                experiment_name=sweep_name,
                tags={"raygpt.sweep": sweep_name},
            )
        )
    return callbacks
