"""A sweep whose --mlflow URI carries a password: its trials log to MLflow's own server
(behind a gate that answers 401 without the password), and the password is in no file
of the sweep folder (sweep.json, trials.parquet, Tune's tuner.pkl, logs) and in none of
its output.
"""

from __future__ import annotations

from mlflow_server import (
    SECRET,
    USER,
    files_holding,
    run_cli,
    tiny_flags,
)


def test_sweep_keeps_the_mlflow_password_out_of_its_folder(data_dir, mlflow_server, tmp_path):
    # A sweep's driver logs each trial to MLflow, and Tune pickles the trials' parameters
    # and the callbacks into the sweep folder (tuner.pkl) beside sweep.json and the parts.
    import mlflow

    port, store = mlflow_server
    uri = f"http://{USER}:{SECRET}@127.0.0.1:{port}"
    sweep_flags = ["--optimizers", "adamw", "--search", "grid", "--grid-points", "1"]
    sweep_flags += ["--scheduler", "fifo", "--name", "sw", "--storage-path", str(tmp_path)]
    result = run_cli("raygpt.sweep", [*sweep_flags, "--mlflow", uri, *tiny_flags(in_process=False)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert SECRET not in output
    assert (tmp_path / "sw" / "tuner.pkl").is_file() and (tmp_path / "sw" / "sweep.json").is_file()
    assert files_holding(tmp_path, SECRET.encode()) == []
    assert files_holding(store, SECRET.encode()) == []
    # The trial reached the server, which takes no request without the password.
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    assert run.info.status == "FINISHED" and "val_loss" in run.data.metrics
