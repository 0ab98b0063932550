"""scripts/device_check.py, the unattended check a GPU machine runs (issue 28), runs on a CPU too: CI runs it on
its tiny model so the script stays working between the rare sessions that have a GPU."""

from __future__ import annotations

import pytest


def test_the_device_check_passes_on_the_cpu(device_check, capsys: pytest.CaptureFixture[str]) -> None:
    code = device_check.main(["--device", "cpu", "--size", "tiny", "--batch-sizes", "1", "3",
                                 "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "device check: PASS" in out
    assert "| lossless | pass | 4 of 4 prompts token-identical |" in out
    assert "| one read per step | pass |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| ar |", "| dynamic", "| s2d2 config-A"))]
    assert len(rows) == 3 and all(len(row.split("|")) == 5 for row in rows)  # a cell per batch size


def test_the_device_check_fails_when_a_step_reads_the_device_more_than_once(device_check, monkeypatch,
                                                                          capsys) -> None:
    """The read counter is real: a planted extra read in the rows' path makes the check fail."""
    import s2d2.core.forwards

    module = device_check
    real = s2d2.core.forwards.Forwards.draft

    def draft_with_a_read(self, *args, **kwargs):
        result = yield from real(self, *args, **kwargs)
        s2d2.core.forwards.torch.zeros(1).tolist()  # what a per-row transfer looks like
        return result

    monkeypatch.setattr(s2d2.core.forwards.Forwards, "draft", draft_with_a_read)
    assert module.main(["--device", "cpu", "--size", "tiny", "--batch-sizes", "1", "--max-new-tokens", "4"]) == 1
    assert "device check: FAIL (one read per step)" in capsys.readouterr().out
