"""dcdit.train_log: log.csv stays readable and aligned across resumes and column changes."""

from __future__ import annotations

import csv

from dcdit.train_log import CSVLog


def test_csv_log_keeps_columns_aligned_when_they_change(tmp_path):
    log = CSVLog(tmp_path / "log.csv")
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 2, "loss": 0.4, "distill_loss": 0.1})
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert rows == [{"step": "1", "loss": "0.5", "distill_loss": ""}, {"step": "2", "loss": "0.4", "distill_loss": "0.1"}]


def test_csv_log_resume_survives_a_malformed_row_and_keeps_earlier_rows(tmp_path):
    """A row longer than the header (an older dcdit's log) must not make resume fail or lose rows."""
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4,extra\n3,0.3\n4,0.2\n")
    CSVLog(path, resume_step=3)
    assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4,extra", "3,0.3"]
    assert not (tmp_path / "log.csv.tmp").exists()
