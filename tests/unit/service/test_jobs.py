"""A sweeps row as a Ray job's parts, without a cluster: its command, its working folder,
its submission id and Ray's states in the service's words. The jobs themselves run in
tests/cluster/test_service.py."""

from __future__ import annotations

import sys

import pytest
from conftest import one_line

from raygpt.errors import UserError
from raygpt.service import db as schema
from raygpt.service import jobs

ROW = {
    "id": 7,
    "name": "lr-scan",
    "storage_path": "/results",
    "folder_uri": "/results/lr-scan",
    "experiment_toml": "[sweep]\ngrid_points = 2\n",
    "flags": ["--optimizers", "adamw", "--name", "mine", "--max-concurrent-trials", "9"],
    "files": {"data_file/tiny.txt": "hello"},
}


def test_the_command_is_the_sweep_drivers_with_the_services_flags_last():
    argv = jobs.command(ROW, concurrency=2)
    assert argv[:4] == [sys.executable, "-m", "raygpt.sweep", jobs.EXPERIMENT_FILE]
    # argparse keeps the last of a repeated flag: the service's name and concurrency win.
    assert argv[-6:] == [
        "--storage-path", "/results", "--name", "lr-scan", "--max-concurrent-trials", "2"
    ]  # fmt: skip
    assert argv[4:-6] == ROW["flags"]
    assert jobs.EXPERIMENT_FILE not in jobs.command(ROW | {"experiment_toml": None}, 1)


def test_the_working_folder_holds_the_experiment_and_the_files(tmp_path):
    jobs.write_working_dir(ROW, tmp_path)
    assert (tmp_path / jobs.EXPERIMENT_FILE).read_text() == ROW["experiment_toml"]
    assert (tmp_path / "data_file" / "tiny.txt").read_text() == "hello"


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", ""])
def test_a_file_outside_the_folder_is_refused(tmp_path, name):
    with pytest.raises(UserError) as err:
        jobs.write_working_dir(ROW | {"files": {name: "x"}}, tmp_path / "job")
    assert "is not a relative path" in one_line(err)
    assert not (tmp_path / "escape.txt").exists()


def test_flags_that_are_not_a_list_of_strings_are_one_line():
    with pytest.raises(UserError) as err:
        jobs.command(ROW | {"flags": ["--seeds", 3]}, 1)
    assert "not a list of strings" in one_line(err)


def test_the_submission_id_is_fixed_by_the_row_and_its_folder():
    assert jobs.submission_id(ROW) == jobs.submission_id(dict(ROW))
    assert jobs.submission_id(ROW).startswith(f"{jobs.SUBMISSION_PREFIX}7-")
    # The same id in another database (another folder) is another job.
    assert jobs.submission_id(ROW) != jobs.submission_id(ROW | {"folder_uri": "/other/lr-scan"})


def test_ray_job_states_in_the_services_words():
    from ray.job_submission import JobStatus

    assert jobs.service_status(JobStatus.PENDING) == schema.RUNNING
    assert jobs.service_status(JobStatus.RUNNING) == schema.RUNNING
    assert jobs.service_status(JobStatus.SUCCEEDED) == schema.SUCCEEDED
    assert jobs.service_status(JobStatus.FAILED) == schema.FAILED
    assert jobs.service_status("STOPPED") == schema.CANCELLED
