"""dcdit.utils helpers that the other tests do not already cover."""

from __future__ import annotations

import builtins

from dcdit import utils


def _fake_cpuinfo(monkeypatch, tmp_path, text: str | None):
    real_open = builtins.open
    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text)

    def fake(file, *args, **kwargs):
        if file == "/proc/cpuinfo":
            if text is None:
                raise FileNotFoundError(file)
            return real_open(path, *args, **kwargs)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)


def test_cpu_info_reads_the_first_processor_block(monkeypatch, tmp_path):
    """Catches reading the last block (a later processor's line overwriting the first) or a key
    split on the wrong colon."""
    _fake_cpuinfo(monkeypatch, tmp_path, "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13: 64-core\n\n"
                                         "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Other\n")
    assert utils.cpu_info() == {"model": "AMD EPYC 7B13: 64-core", "vendor": "AuthenticAMD"}


def test_cpu_info_without_proc_cpuinfo_says_unknown(monkeypatch, tmp_path):
    _fake_cpuinfo(monkeypatch, tmp_path, None)
    monkeypatch.setattr("platform.processor", lambda: "")
    assert utils.cpu_info() == {"model": "unknown", "vendor": "unknown"}
