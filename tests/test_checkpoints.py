"""Checkpoints that cannot silently go wrong: manifests, leftovers of killed or failed writes, a full
disk, and damaged checkpoints skipped (with a warning naming them) for the newest intact one."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcdit.checkpoint import (
    CHECKPOINT_FILES,
    checkpoint_problems,
    find_checkpoint,
    load_model,
    read_training_state,
    remove_stale_temporaries,
    save_checkpoint,
    torch_load_safely,
)
from dcdit.cli import main
from dcdit.config import build_model, load_run_config
from dcdit.errors import CheckpointError, DcditWarning, DiskFullError, UnsafePickleError
from dcdit.train import train

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
        "train.global_batch_size=4", "train.ratio_batch_size=4", "train.log_every=2", "train.ckpt_every=2",
        "train.tensorboard=false", "train.lr=1e-3"]


class Parts:
    """A tiny model, its EMA and optimizer, and save(run, step) writing a real checkpoint of them."""

    def __init__(self):
        self.cfg = load_run_config("mnist", TINY)
        torch.manual_seed(0)
        self.model = build_model(self.cfg.model)
        self.ema = copy.deepcopy(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters())

    def save(self, run: Path, step: int, keep_last: int = 5) -> Path:
        return save_checkpoint(run, step, self.model, self.ema, self.opt, self.cfg, {"skipped_steps": 0}, keep_last=keep_last)


@pytest.fixture
def parts():
    return Parts()


@pytest.fixture
def run_with_two(parts, tmp_path):
    run = tmp_path / "run"
    parts.save(run, 2)
    parts.save(run, 4)
    return run


def test_manifest_records_sizes_and_hashes(run_with_two):
    """Compared with os.stat and hashlib on the files as they are on disk."""
    ckpt = run_with_two / "checkpoints" / "0000004"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(CHECKPOINT_FILES)
    for name, entry in files.items():
        assert entry["bytes"] == (ckpt / name).stat().st_size
        assert entry["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert checkpoint_problems(ckpt, full=True) == []
    assert read_training_state(ckpt)["step"] == 4


def test_stale_temporaries_are_removed_and_nothing_else(run_with_two, parts):
    root = run_with_two / "checkpoints"
    (root / ".tmp-0000006-4242").mkdir()
    (root / ".tmp-0000006-4242" / "model.safetensors").write_bytes(b"x" * 1000)
    (root / ".tmp-old-0000004-99").mkdir()
    (root / ".latest.abc123.tmp").write_text("0000006")
    removed = remove_stale_temporaries(run_with_two)
    assert sorted(p.name for p in removed) == [".latest.abc123.tmp", ".tmp-0000006-4242", ".tmp-old-0000004-99"]
    assert sorted(p.name for p in root.iterdir()) == ["0000002", "0000004", "latest"]
    assert remove_stale_temporaries(run_with_two / "nowhere") == []
    (root / ".tmp-0000008-1").mkdir()  # the next save removes leftovers too
    parts.save(run_with_two, 6)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_write_killed_midway_leaves_only_a_temporary(tmp_path):
    """SIGKILL while the checkpoint is being written (after model.safetensors): the run keeps its
    previous checkpoint, `latest` still names it, and the leftover is what remove_stale_temporaries takes."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import dcdit.checkpoint as C
        from test_checkpoints import Parts
        parts = Parts()
        parts.save({str(tmp_path / 'run')!r}, 2)
        real = C.save_weights
        def die_after_model(path, *a, **k):
            real(path, *a, **k)
            if path.name == "model.safetensors":
                os.kill(os.getpid(), signal.SIGKILL)
        C.save_weights = die_after_model
        parts.save({str(tmp_path / 'run')!r}, 4)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    left = [p.name for p in root.iterdir() if p.name.startswith(".tmp-0000004-")]
    assert len(left) == 1 and (root / left[0] / "model.safetensors").exists()
    assert (root / "latest").read_text() == "0000002" and find_checkpoint(tmp_path / "run") == root / "0000002"
    assert [p.name for p in remove_stale_temporaries(tmp_path / "run")] == left
    assert sorted(p.name for p in root.iterdir()) == ["0000002", "latest"]


class FullDiskFile:
    """A real file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, path, mode, room):
        self.f, self.room = open(path, mode), room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_during_torch_save_is_named_and_leaves_nothing(run_with_two, parts, monkeypatch):
    """torch.save onto a full disk raises an obscure RuntimeError ("unexpected pos ...", measured on a
    full tmpfs) with the OSError(ENOSPC) as its context; only that OS error is injected here."""
    import dcdit.checkpoint as C

    monkeypatch.setattr(C, "open", lambda path, mode="r": FullDiskFile(path, mode, room=1000), raising=False)
    with pytest.raises(DiskFullError) as e:
        parts.save(run_with_two, 6)
    msg = str(e.value)
    assert "disk is full" in msg and str(run_with_two / "checkpoints") in msg and "0000006" in msg and "\n" not in msg
    assert e.value.errno == errno.ENOSPC and isinstance(e.value.__cause__, RuntimeError)  # torch's own error
    root = run_with_two / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["0000002", "0000004", "latest"]
    assert (root / "latest").read_text() == "0000004" and checkpoint_problems(root / "0000004") == []


def test_full_disk_while_training_names_the_folder(tmp_path, capsys, monkeypatch):
    """The checkpoint write meets ENOSPC (injected below torch.save, which wraps it in an obscure
    RuntimeError on a real full disk): one line saying the disk is full and where, nothing left behind."""
    import dcdit.checkpoint as C

    monkeypatch.setattr(C, "open", lambda path, mode="r": FullDiskFile(path, mode, room=100), raising=False)
    run = tmp_path / "run"
    assert main(["train", "mnist", *TINY, "train.steps=2", "--out", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("dcdit train: error: the disk is full")
    assert str(run / "checkpoints") in err and "--resume" in err
    assert list((run / "checkpoints").iterdir()) == []


def test_full_disk_during_safetensors_write(run_with_two, parts, monkeypatch):
    """safetensors words it "I/O error: No space left on device (os error 28)" (its message on a full tmpfs)."""
    import dcdit.checkpoint as C
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(C, "save_file", full)
    with pytest.raises(DiskFullError, match="disk is full"):
        parts.save(run_with_two, 6)
    assert not [p for p in (run_with_two / "checkpoints").iterdir() if p.name.startswith(".")]


def test_other_write_errors_are_not_called_a_full_disk(run_with_two, parts, monkeypatch):
    import dcdit.checkpoint as C

    monkeypatch.setattr(C, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        parts.save(run_with_two, 6)
    assert not [p for p in (run_with_two / "checkpoints").iterdir() if p.name.startswith(".")]


def truncate(path: Path, keep: int | None = None) -> None:
    os.truncate(path, path.stat().st_size // 2 if keep is None else keep)


def flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": lambda c: truncate(c / "model.safetensors"),
    "empty ema": lambda c: truncate(c / "ema.safetensors", 0),
    "bad safetensors header": lambda c: flip_header_byte(c / "ema.safetensors"),
    "missing training state": lambda c: (c / "training_state.pt").unlink(),
    "truncated training state": lambda c: truncate(c / "training_state.pt"),
    "missing folder": lambda c: __import__("shutil").rmtree(c),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_intact(run_with_two, damage):
    latest = run_with_two / "checkpoints" / "0000004"
    DAMAGE[damage](latest)
    with pytest.warns(DcditWarning, match="0000004") as w:
        found = find_checkpoint(run_with_two)
    assert found == run_with_two / "checkpoints" / "0000002"
    assert "using" in str(w[0].message) and "0000002" in str(w[0].message)


@pytest.mark.parametrize("damage", ["truncated model", "bad safetensors header", "truncated training state"])
def test_damage_is_found_without_a_manifest(run_with_two, damage):
    """Checkpoints written before manifests existed: the headers alone reveal truncation."""
    latest = run_with_two / "checkpoints" / "0000004"
    (latest / "manifest.json").unlink()
    assert checkpoint_problems(latest, CHECKPOINT_FILES) == []
    DAMAGE[damage](latest)
    assert checkpoint_problems(latest, CHECKPOINT_FILES)


def test_without_a_manifest_the_weights_are_what_is_required(run_with_two):
    """A run converted from the release (weights and config only) is intact; a missing weight file is not."""
    latest = run_with_two / "checkpoints" / "0000004"
    for name in ("manifest.json", "training_state.pt"):
        (latest / name).unlink()
    assert find_checkpoint(run_with_two) == latest
    (latest / "model.safetensors").unlink()
    with pytest.warns(DcditWarning, match="model.safetensors is missing"):
        assert find_checkpoint(run_with_two) == run_with_two / "checkpoints" / "0000002"


def test_a_flipped_data_byte_needs_the_full_check(run_with_two):
    """The quick check reads headers only; full=True compares the SHA-256 written with the checkpoint."""
    path = run_with_two / "checkpoints" / "0000004" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data
    path.write_bytes(bytes(data))
    assert checkpoint_problems(path.parent) == []
    assert checkpoint_problems(path.parent, full=True) == ["model.safetensors is corrupt (its SHA-256 differs from the one written)"]


def test_sampling_needs_only_its_weights(run_with_two):
    """A checkpoint with a damaged training_state.pt is still the latest model for sampling."""
    truncate(run_with_two / "checkpoints" / "0000004" / "training_state.pt")
    model, _, step = load_model(run_with_two)
    assert step == 4


def test_no_intact_checkpoint_lists_every_problem(run_with_two):
    truncate(run_with_two / "checkpoints" / "0000004" / "model.safetensors")
    (run_with_two / "checkpoints" / "0000002" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        find_checkpoint(run_with_two)
    msg = str(e.value)
    assert "0000004 (model.safetensors is truncated" in msg and "0000002 (ema.safetensors is missing)" in msg


def test_a_damaged_checkpoint_named_directly_is_refused(run_with_two):
    ckpt = run_with_two / "checkpoints" / "0000004"
    truncate(ckpt / "ema.safetensors")
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is damaged: ema.safetensors is truncated"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(ckpt / "ema.safetensors")


def test_writing_the_same_step_again_replaces_it(run_with_two, parts):
    with torch.no_grad():
        next(parts.model.parameters()).add_(1.0)
    parts.save(run_with_two, 4)
    root = run_with_two / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["0000002", "0000004", "latest"]
    saved = load_file(str(root / "0000004" / "model.safetensors"))
    name, first = next(iter(parts.model.state_dict().items()))
    assert torch.equal(saved[name], first) and checkpoint_problems(root / "0000004", full=True) == []


def test_resume_from_a_damaged_latest_matches_the_uninterrupted_run(tmp_path):
    """Resume skips the truncated latest checkpoint (4) for the intact one (2) and, with a stale temporary
    folder in the way, still reproduces a straight 6-step run bit for bit."""
    train(load_run_config("mnist", TINY + ["train.steps=6"]), tmp_path / "straight", progress=False)
    run = tmp_path / "run"
    train(load_run_config("mnist", TINY + ["train.steps=4"]), run, progress=False)
    truncate(run / "checkpoints" / "0000004" / "model.safetensors")
    (run / "checkpoints" / ".tmp-0000006-1").mkdir()
    with pytest.warns(DcditWarning, match="0000004"):
        train(load_run_config("mnist", TINY + ["train.steps=6"]), run, resume=True, progress=False)
    for which in ("model", "ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "0000006" / f"{which}.safetensors"))
        b = load_file(str(run / "checkpoints" / "0000006" / f"{which}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), which
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sample_warns_in_one_line_and_uses_the_intact_checkpoint(run_with_two, tmp_path, capsys):
    truncate(run_with_two / "checkpoints" / "0000004" / "ema.safetensors")
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(run_with_two), "--out", str(out), "--steps", "2", "--per-class", "1",
                 "--classes", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dcdit: warning: skipping damaged checkpoint")
    assert "0000004 (ema.safetensors is truncated" in err[0] and "0000002" in err[0]
    assert json.loads((out / "settings.json").read_text())["ckpt_step"] == 2


class Payload:
    """Unpickling this would create the marker file: it must never happen."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_with_objects_are_refused_and_never_run(tmp_path):
    Payload.marker = str(tmp_path / "ran")
    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError) as e:
        torch_load_safely(tmp_path / "evil.pt")
    assert str(tmp_path / "evil.pt") in str(e.value) and "weights_only" in str(e.value)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch .pt file"):
        torch_load_safely(tmp_path / "text.pt")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pt")
    assert torch.equal(torch_load_safely(tmp_path / "ok.pt")["w"], torch.zeros(1000))
    truncate(tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        torch_load_safely(tmp_path / "ok.pt")


def test_a_model_saved_under_looser_checks_still_loads(parts, tmp_path):
    """Configs inside checkpoints load as written: a run whose ratio groups did not divide its batch
    (refused for new runs) is still a model to sample from."""
    import dataclasses

    from dcdit.checkpoint import save_weights
    from dcdit.errors import ConfigError

    cfg = dataclasses.replace(parts.cfg, train=dataclasses.replace(parts.cfg.train, global_batch_size=8, ratio_batch_size=16))
    with pytest.raises(ConfigError, match="train.ratio_batch_size is 16"):
        load_run_config("mnist", TINY + ["train.global_batch_size=8", "train.ratio_batch_size=16"])
    save_weights(tmp_path / "old.safetensors", parts.model.state_dict(), cfg, step=3)
    model, loaded, step = load_model(tmp_path / "old.safetensors")
    assert step == 3 and loaded.train.ratio_batch_size == 16


def test_setup_run_removes_a_killed_writes_leftovers_before_resuming(tmp_path):
    """Training starts or resumes with no `.tmp-*` folder left in the run (before anything is saved:
    a resume that never reaches a checkpoint must not keep a 13 MB leftover forever)."""
    from dcdit.train import setup_run

    cfg = load_run_config("mnist", TINY + ["train.steps=2"])
    train(cfg, tmp_path / "run", progress=False)
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-0000004-4242").mkdir()
    (root / ".tmp-0000004-4242" / "model.safetensors").write_bytes(b"x" * 1000)
    run = setup_run(cfg, tmp_path / "run", resume=True, device="cpu")
    assert run.step == 2 and sorted(p.name for p in root.iterdir()) == ["0000002", "latest"]
