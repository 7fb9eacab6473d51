"""--profile-steps: per-rank torch.profiler traces of chosen steps, and what is refused."""
from __future__ import annotations

import json

import pytest

from helpers import run_train

FLAGS = ("--epochs", "1", "--batch-size", "16")


@pytest.fixture(scope="module")
def profiled(tiny_data, tmp_path_factory):
    """2 ranks, steps 5-8 profiled."""
    run = tmp_path_factory.mktemp("profiled") / "run"
    res = run_train(2, tiny_data, run, *FLAGS, "--profile-steps", "5-8")
    assert res.returncode == 0, res.stderr
    return run, res


def events(path) -> list[dict]:
    return json.loads(path.read_text())["traceEvents"]


def test_each_rank_writes_a_trace_of_the_training_steps_operators(profiled):
    run, _ = profiled
    traces = sorted((run / "profile").glob("*.json"))
    assert [p.name for p in traces] == ["rank-0.json", "rank-1.json"]
    for path in traces:
        names = {e.get("name") for e in events(path)}
        assert {"aten::addmm", "aten::cross_entropy_loss", "aten::_fused_adam_"} <= names, sorted(names)[:50]
        steps = [e for e in events(path) if e.get("name") == "aten::_fused_adam_"]
        assert len(steps) == 4, "one Adam step each for steps 5, 6, 7 and 8"


def test_rank_0_prints_the_top_operators_by_self_time(profiled):
    out = profiled[1].stdout
    assert "profile of steps 5-8 in " in out and "Self CPU" in out
    table = out[out.index("profile of steps 5-8"):].split("Self CPU time total")[0].splitlines()
    rows = [line for line in table[4:] if line.strip() and not line.startswith("---")]
    assert len(rows) == 10 and any(row.lstrip().startswith("aten::") for row in rows), table


def test_profile_ranks_limits_the_traces_to_those_ranks(tiny_data, tmp_path):
    run = tmp_path / "run"
    res = run_train(2, tiny_data, run, *FLAGS, "--profile-steps", "2-3", "--profile-ranks", "1")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (run / "profile").glob("*.json")] == ["rank-1.json"]
    assert "profile of steps" not in res.stdout, "rank 0 was not profiled: no table"


@pytest.mark.parametrize("steps, says", [("30-40", "is outside the run: it has steps 1 to 32"),
                                         ("8-5", "wants 1 <= A <= B"), ("five", "wants A-B")])
def test_a_range_the_run_cannot_profile_is_refused_in_one_line(tiny_data, tmp_path, steps, says):
    res = run_train(2, tiny_data, tmp_path / "run", *FLAGS, "--profile-steps", steps)
    assert "exitcode  : 2" in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("mnist-dist: error:")]
    assert len(errors) == 1 and says in errors[0] and "mnist_dist/" not in res.stderr, res.stderr
    assert not (tmp_path / "run" / "profile").exists()
