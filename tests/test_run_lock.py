"""dcdit.run_lock: one training process per run folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dcdit.cli import main as cli_main
from dcdit.config import load_run_config
from dcdit.run_lock import LOCK_NAME, RunLocked, acquire, release, run_lock
from dcdit.train import train

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=8", "model.conv_norm_groups=4",
        "train.global_batch_size=4", "train.ratio_batch_size=4", "train.log_every=1", "train.ckpt_every=100", "train.tensorboard=false"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_owner_keeps_the_lock_and_a_gone_one_loses_it(tmp_path):
    """Catches a lock that is not exclusive, one never taken over after a kill (a run that could never
    resume), and one taken from a live process or from another host (whose pids mean nothing here)."""
    lock = acquire(tmp_path)
    assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    with pytest.raises(RunLocked, match=f"process {os.getpid()} .*delete {lock}"):
        acquire(tmp_path)
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # another live process
    with pytest.raises(RunLocked):
        acquire(tmp_path)
    lock.write_text(f"{socket.gethostname()} {_dead_pid()}")  # a killed run's leftover
    assert acquire(tmp_path) == lock and lock.read_text().endswith(f" {os.getpid()}")
    lock.write_text(f"other-host {_dead_pid()}")
    with pytest.raises(RunLocked, match="other-host"):
        acquire(tmp_path)


def test_the_lock_is_released_on_exit_and_on_error_but_only_by_its_owner(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(KeyError), run_lock(tmp_path):
        raise KeyError
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getppid()}")
    release(tmp_path / LOCK_NAME)  # not ours: stays
    assert (tmp_path / LOCK_NAME).exists()
    with run_lock(tmp_path, enabled=False):  # other ranks do not take it
        pass
    with pytest.raises(KeyError), run_lock(tmp_path / "new"):  # a refused start leaves no folder
        raise KeyError
    assert not (tmp_path / "new").exists()


def test_a_second_trainer_of_a_run_stops_before_touching_it(tmp_path, capsys):
    """`dcdit train` on a folder another live process trains: one line, exit 2, nothing written; the
    same run trains once the lock is gone and leaves no lock behind."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{socket.gethostname()} {os.getppid()}")
    assert cli_main(["train", "mnist", *TINY, "train.steps=1", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is being trained by process" in err[0] and LOCK_NAME in err[0]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    (run / LOCK_NAME).unlink()
    train(load_run_config("mnist", [*TINY, "train.steps=1"]), run, progress=False)
    assert (run / "train_summary.json").exists() and not (run / LOCK_NAME).exists()
