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


def test_few_shot_summary_at_second_order_tests_the_state():
    """eps_test is a metric of the state (docs/models/anil.md 5.7): the representation
    of a second-order flow is tested at finite n_s like that of a first-order one;
    the numbers are the kernel's metric at the same states, which does not depend
    on the outer order."""
    from runtime import flow, load
    from runtime.scenarios import REFERENCE, few_shot_summary, reference_init, summary_lines

    params = {**REFERENCE["params"], "order": 2}
    fl = flow("anil", reference_init(1e-3), params, t_max=0.1, dt=0.01)
    fs = few_shot_summary(fl)
    assert "not_derived" not in fs
    kernel = load("anil")
    spec = kernel.model
    K, M = fl.R.shape[-2:]
    y = kernel.pack_state({name: fl.arrays[name][-1] for name, _ in kernel.module.STATE}, K, M)
    c = kernel.pack_consts({name: fl.arrays[name] for name, _ in kernel.module.CONSTS}, K, M)
    col = list(kernel.metric_names).index("eps_meta")
    for n_s, got in zip(fs["n_s"], fs["eps_test_final"]):
        by_order = []
        for order in (1, 2):
            p = kernel.param_vector(spec.resolve_params({**params, "order": order, "n_s": n_s}))
            by_order.append(kernel.metrics(y, c, p, K, M)[col])
        assert by_order[0] == by_order[1] == got, (n_s, by_order, got)
    # fewer support samples adapt worse
    assert fs["eps_test_final"][0] > fs["eps_test_final"][1] > fs["eps_test_final"][2]
    json.dumps(fs, allow_nan=False)  # valid JSON, no NaN
    summary = {"final_alpha": 0.1, "final_eps_meta": 0.3, "final_eps_opt": 0.3, "final_max_abs_r": 0.1}
    lines = summary_lines({**summary, "few_shot": fs})
    assert "not derived" not in lines[-1]
