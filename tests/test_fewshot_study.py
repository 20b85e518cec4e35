"""The ``fewshot`` study (runtime.scenarios.study_fewshot): the reference scenario
trained with finite support sets, its JSON and the sanity of its numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from runtime.few_shot import DEFAULT_N_S
from runtime.scenarios import FEWSHOT_N_S, run_study


def _tag(v: float) -> str:
    return f"{v:g}" if math.isfinite(v) else "inf"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot")
    result = run_study("fewshot", out, progress=False)
    return out, result


def test_fewshot_study_writes_its_json_and_figure(study):
    out, result = study
    assert json.loads((out / "fewshot.json").read_text()) == result
    data = (out / "fewshot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000
    quantities = [
        "final Q_kk (mean)", "final max |Q_kl|, k != l", "final r_kk (mean)", "final max |r_km|, k != m"
    ]  # fmt: skip
    tests = [f"eps_test at n_s_test = {_tag(v)}" for v in DEFAULT_N_S]
    expected = []
    for n_s in FEWSHOT_N_S:
        label = f"n_s = {_tag(n_s)}"
        expected += [label, *(f"{label}: {q}" for q in quantities + tests)]
    for what in ("initial representation", "teacher's features"):
        expected += [f"{what}: {t}" for t in tests]
    assert list(result) == expected
    assert all(math.isfinite(v) for v in result.values())


def test_fewshot_study_numbers_are_sane(study):
    _, r = study
    labels = [f"n_s = {_tag(v)}" for v in FEWSHOT_N_S]
    final = np.array([r[label] for label in labels])
    # more support samples in training, a lower final eps_meta; the population (inf) lowest
    assert np.all(np.diff(final) < 0), final
    for n_s, label in zip(FEWSHOT_N_S, labels):
        if n_s in DEFAULT_N_S:  # the meta-test at the training support size is the flow's own eps_meta
            assert r[f"{label}: eps_test at n_s_test = {_tag(n_s)}"] == pytest.approx(r[label], rel=1e-9)
        # every unit specialises to one teacher unit
        assert r[f"{label}: final r_kk (mean)"] > 0.95 and r[f"{label}: final max |r_km|, k != m"] < 0.05
        curve = np.array([r[f"{label}: eps_test at n_s_test = {_tag(v)}"] for v in DEFAULT_N_S])
        # the few-shot curve falls with the test support size from n_s_test = 2 on
        assert np.all(np.diff(curve[1:]) < 0), (label, curve)
        initial = [r[f"initial representation: eps_test at n_s_test = {_tag(v)}"] for v in DEFAULT_N_S]
        assert np.all(curve[1:] < np.array(initial[1:])), label
    teacher = np.array([r[f"teacher's features: eps_test at n_s_test = {_tag(v)}"] for v in DEFAULT_N_S])
    assert np.all(np.diff(teacher) < 0), teacher
    assert sum(n_s in DEFAULT_N_S for n_s in FEWSHOT_N_S) >= 2  # the identity above was checked


def test_few_shot_summary_says_what_the_kernel_does_not_derive():
    """At second order finite support sets are not derived (docs/models/anil.md 5.6):
    the main job's summary has None there, says why, and prints "not derived"."""
    from runtime import flow
    from runtime.scenarios import REFERENCE, few_shot_summary, reference_init, summary_lines

    fl = flow("anil", reference_init(1e-3), {**REFERENCE["params"], "order": 2}, t_max=0.1, dt=0.01)
    fs = few_shot_summary(fl)
    assert fs["eps_test_final"] == fs["eps_test_initial"] == fs["eps_test_teacher"] == [None] * 3
    assert len(fs["not_derived"]) == 3 and all("n_s" in why for why in fs["not_derived"])
    json.dumps(fs, allow_nan=False)  # valid JSON, no NaN
    summary = {"final_alpha": 0.1, "final_eps_meta": 0.3, "final_eps_opt": 0.3, "final_max_abs_r": 0.1}
    lines = summary_lines({**summary, "few_shot": fs})
    assert lines[-1].count("not derived") == 3
