"""The start-up benchmark's flow (radixlm/bench/startup.py) on the tiny model: no timing assertions."""

from radixlm.bench.startup import launch_once, main, parse_timeline, phases, summarize


def test_parse_timeline_and_phases():
    log = ("[x detokenizer] start-up timeline (s since launch): detokenizer.imported=2.72 detokenizer.tokenizer=2.75\n"
           "INFO: something else=1.0\n"
           "[x] start-up timeline (s since launch): main.imported=1.74 main.tokenizer=2.68 children.started=2.70 "
           "scheduler.imported=2.71 scheduler.model=3.25 main.serving=3.30\n")
    marks = parse_timeline(log)
    assert marks["main.imported"] == 1.74 and marks["detokenizer.tokenizer"] == 2.75 and "else" not in marks
    s = summarize([{"health_s": 3.4, "first_token_s": 3.5, "timeline": marks},
                   {"health_s": 3.6, "first_token_s": 3.9, "timeline": marks}])
    assert s["health_s"] == {"median": 3.5, "min": 3.4, "max": 3.6}
    steps = {k: round(d, 2) for k, _, d in phases(s["timeline_median_s"])}
    assert steps["main.imported"] == 1.74 and steps["main.tokenizer"] == 0.94
    assert steps["scheduler.imported"] == 0.01 and steps["scheduler.model"] == 0.54  # from children.started
    assert steps["main.serving"] == 0.60  # the main process's previous mark: children.started


def test_launch_once_reaches_health_and_first_token(qwen2_path):
    r = launch_once(qwen2_path, timeout=240)
    assert 0 < r["health_s"] <= r["first_token_s"]
    for mark in ("main.imported", "main.tokenizer", "children.started", "scheduler.model", "main.serving",
                 "detokenizer.tokenizer"):
        assert mark in r["timeline"], r["timeline"]


def test_main_reports_each_model(qwen2_path, tmp_path, capsys):
    out = tmp_path / "startup.json"
    results = main(["--model-path", qwen2_path, "--num-runs", "1", "--output-json", str(out)])
    assert results[qwen2_path]["current"]["runs"] == 1
    assert out.exists() and "health median" in capsys.readouterr().out
