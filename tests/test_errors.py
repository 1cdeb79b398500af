"""One CLI error handler (dcdit.errors via dcdit.cli.main): every failure a user can cause ends in
exactly one line on stderr that names the file or key and what to do, no traceback; --debug and
DCDIT_DEBUG=1 show the traceback as well."""

from __future__ import annotations

import errno
import importlib.util
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dcdit.cli import main
from dcdit.errors import explain, run_command

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
        "train.global_batch_size=4", "train.ratio_batch_size=4", "train.log_every=1", "train.ckpt_every=2",
        "train.tensorboard=false"]


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dcdit {command}: error: ")
    return lines[0]


class Payload:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only one, or (as root, who may write
    anywhere) a place under /sys where the kernel refuses new folders."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").mkdir()
    except PermissionError:
        return ro / "run"
    (ro / "probe").rmdir()
    if os.path.isdir("/sys/fs"):
        return Path("/sys/fs/dcdit-test/run")
    pytest.skip("no folder this process cannot write")


def make_cases(tmp_path: Path) -> dict:
    """name -> (argv, exit code, substrings the one line must contain)."""
    Payload.marker = str(tmp_path / "payload-ran")
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "plain.pt")
    (tmp_path / "bad.yaml").write_text("_base_: mnist.yaml\nmodel:\n  depth: [1, 2\ntrain:\n  lr: 1\n")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"0" * 64)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    out = str(tmp_path / "out")
    readonly = unwritable_folder(tmp_path)
    return {
        "blocked pickle": (["upcycle", "mnist", "--dit", str(tmp_path / "evil.pt")], 2,
                           [str(tmp_path / "evil.pt"), "weights_only", "Python objects other than tensors"]),
        "read-only output folder": (["train", "mnist", *TINY, "train.steps=1", "--out", str(readonly), "--no-progress"], 1,
                                    ["permission denied for", str(readonly.parent), "--out"]),
        "malformed YAML": (["train", str(tmp_path / "bad.yaml")], 2, ["bad.yaml, line 4, column 6", "fix the file"]),
        "malformed override": (["train", "mnist", "train.lr=[1,"], 2, ["override value '[1,'"]),
        "a .pt as --ckpt": (["sample", "--ckpt", str(tmp_path / "plain.pt"), "--out", out], 2,
                            ["plain.pt is a torch.save archive", "not a dcdit checkpoint", "dcdit convert-release", "dcdit upcycle"]),
        "a .pt as the config": (["train", str(tmp_path / "plain.pt")], 2, ["plain.pt is not a text (YAML) file"]),
        "input_size=abc": (["train", "mnist", "model.input_size=abc"], 2, ["model.input_size is 'abc'", "list of two integers"]),
        "train.steps=0": (["train", "mnist", "train.steps=0"], 2, ["train.steps is 0", "integer >= 1"]),
        "missing checkpoint": (["sample", "--ckpt", str(tmp_path / "nope"), "--out", out], 2, ["nope", "does not exist"]),
        "missing config": (["train", str(tmp_path / "nope.yaml")], 2, ["nope.yaml", "not found"]),
        "missing pretrained DiT": (["upcycle", "mnist", "--dit", str(tmp_path / "nope.pt")], 2, ["nope.pt", "does not exist"]),
        "missing init_from": (["train", "mnist", *TINY, f"train.init_from={tmp_path / 'nope.safetensors'}",
                               "--out", out, "--no-progress"], 2, ["nope.safetensors"]),
        "corrupt safetensors": (["sample", "--ckpt", str(tmp_path / "garbage.safetensors"), "--out", out], 2,
                                ["garbage.safetensors is not a readable .safetensors file", "truncated or corrupt"]),
        "foreign safetensors": (["sample", "--ckpt", str(tmp_path / "foreign.safetensors"), "--out", out], 2,
                                ["foreign.safetensors", "not written by dcdit"]),
        "optional package missing": (["train", "mnist", *TINY, "train.steps=1", "train.wandb=true", "--out", out,
                                      "--no-progress"], 2, ["'wandb' is not installed", "pip install wandb"]),
    }


CASES = ["blocked pickle", "read-only output folder", "malformed YAML", "malformed override", "a .pt as --ckpt",
         "a .pt as the config", "input_size=abc", "train.steps=0", "missing checkpoint", "missing config",
         "missing pretrained DiT", "missing init_from", "corrupt safetensors", "foreign safetensors",
         "optional package missing"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_end_in_one_line(case, tmp_path, capsys):
    argv, code, needles = make_cases(tmp_path)[case]
    if case == "optional package missing" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    assert main(argv) == code
    line = one_error_line(capsys, argv[0])
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "payload-ran").exists()  # the blocked pickle never ran


@pytest.mark.parametrize("case", ["blocked pickle", "malformed YAML", "input_size=abc", "a .pt as --ckpt"])
def test_debug_shows_the_traceback(case, tmp_path, capsys, monkeypatch):
    argv, code, needles = make_cases(tmp_path)[case]
    assert main([*argv, "--debug"]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(f"dcdit {argv[0]}: error:")
    monkeypatch.setenv("DCDIT_DEBUG", "1")
    assert main(argv) == code
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_training_state_passed_as_ckpt_points_to_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "mnist", *TINY, "train.steps=2", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    ckpt = run / "checkpoints" / "0000002"
    assert main(["sample", "--ckpt", str(ckpt / "training_state.pt"), "--out", str(tmp_path / "s")]) == 2
    line = one_error_line(capsys, "sample")
    assert f"pass the checkpoint folder {ckpt}" in line


def test_explain_translations():
    """The translations the commands above cannot easily provoke, on the real exception types."""
    from safetensors import SafetensorError

    assert explain(KeyboardInterrupt()) == ("interrupted", 130)
    msg, code = explain(OSError(errno.ENOSPC, "No space left on device"), out="runs/x")
    assert code == 1 and "disk is full" in msg and "runs/x" in msg
    msg, code = explain(PermissionError(errno.EACCES, "Permission denied", "/data/out"))
    assert code == 1 and "permission denied for /data/out" in msg
    msg, code = explain(SafetensorError("Error while deserializing header: header too large"))
    assert code == 2 and "truncated or corrupt" in msg
    with pytest.raises(pickle.UnpicklingError) as e:
        Payload.marker = os.devnull
        import io

        buf = io.BytesIO()
        torch.save({"x": Payload()}, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    msg, code = explain(e.value)
    assert code == 2 and "weights_only" in msg and "\n" not in msg and "\x1b" not in msg
    assert explain(RuntimeError("a bug")) is None and explain(TypeError("a bug")) is None


def test_bugs_keep_their_traceback():
    """An exception no user can cause is not hidden behind a one-line message."""
    def buggy(args):
        raise TypeError("unsupported operand")

    with pytest.raises(TypeError):
        run_command(buggy, None, "x")
