"""A run killed before it recorded its finish says so at the top of its pages."""

import json

from cli import report


def test_a_run_without_its_finish_says_it_did_not_finish(tmp_path):
    env = {"target": "moe_journey", "device": "Test GPU", "device_type": "cuda", "command": "aisp bench run",
           "started_utc": "x"}
    (tmp_path / "environment.json").write_text(json.dumps(env))
    (tmp_path / "rows.jsonl").write_text("")
    report.write_report(tmp_path)
    assert (tmp_path / "summary.md").read_text().splitlines()[2].startswith("**Did not finish:**")
    assert "Did not finish:" in (tmp_path / "report.html").read_text()
    env.update(finished_utc="y", interrupted=False)
    (tmp_path / "environment.json").write_text(json.dumps(env))
    report.write_report(tmp_path)
    assert "Did not finish" not in (tmp_path / "summary.md").read_text()
