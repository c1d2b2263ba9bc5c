"""The study's experiments: plans, iso-parameter sizing, shared runs, each command end to end on a tiny budget."""

import json

import pytest

from qkvlab.cli.main import main
from qkvlab.errors import QkvlabError
from qkvlab.experiments import context_length, core, positions, scale
from qkvlab.experiments.iso_parameter import count_params, iso_d_mlp
from qkvlab.experiments.plan import read_plan, write_plan
from qkvlab.experiments.study import STUDY, plan_study
from qkvlab.tasks.registry import get_task

TASK_MODELS = ["sort-32", "reverse-16", "mnist", "set-anomaly", "oneclass-mnist", "segmentation-42",
               "shakespeare-char", "ptb-word"]
TIED = ["Q=K-V", "Q-K=V", "Q=K=V", "Q=X", "Q=K-V+", "Q=K=V+", "Q-GQA-4", "Q-MQA"]


@pytest.mark.parametrize("task", TASK_MODELS)
@pytest.mark.parametrize("preset", ["quick", "tiny"])
def test_iso_parameter_width_brings_every_tied_variant_within_one_percent_of_qkv(task, preset):
    baseline = get_task(task).model_config("QKV", preset)
    target = count_params(baseline)
    for variant in TIED:
        if variant.endswith("+") and baseline.kind == "decoder" or "GQA" in variant and baseline.n_heads % 4:
            continue
        if "MQA" in variant and baseline.kind != "decoder":
            continue
        tied = baseline.replace(variant=variant)
        width = iso_d_mlp(baseline, variant)
        total = count_params(tied.replace(d_mlp=width))
        assert abs(total - target) <= 0.01 * target, (task, variant, total, target)
        assert count_params(tied) < target  # a tie saves parameters, and the width spends them
        assert width > (tied.d_mlp or 4 * tied.d_model)


def test_iso_width_is_exact_arithmetic_for_the_char_lm():
    """Q-K=V saves d^2 + d per layer (W_v and its bias); an MLP unit costs 2d + 1: 16,512 / 257 = 64.2 -> 64."""
    baseline = get_task("shakespeare-char").model_config("QKV", "quick")
    assert baseline.d_model == 128 and (baseline.d_mlp or 512) == 512
    assert iso_d_mlp(baseline, "Q-K=V") == 512 + 64


def test_core_plan_runs_each_family_with_the_study_variants(tmp_path):
    runs = core.plan(tmp_path, [0, 1, 2])
    by_task = {}
    for p in runs:
        by_task.setdefault(p.run.task, set()).add(p.run.variant)
    assert set(by_task) == set(core.TASKS)
    assert {"QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X"} <= by_task["mnist"]
    assert {"Q=K-V+", "Q=K=V+"} <= by_task["sort-32"]
    assert {"GQA-4", "MQA", "Q-GQA-4", "Q-MQA"} <= by_task["shakespeare-char"]
    assert not any(v.endswith("+") for v in by_task["mnist"])
    assert len({p.run.run_dir for p in runs}) == len(runs)
    assert {p.run.seed for p in runs} == {0, 1, 2}


def test_context_length_keeps_tokens_per_step_and_shares_the_native_context(tmp_path):
    runs = context_length.plan(tmp_path, [0])
    task = get_task("shakespeare-char")
    native, batch = task.model_config("QKV").max_seq_len, task.budget("quick").batch_size
    for p in runs:
        o = dict(x.split("=", 1) for x in p.run.overrides)
        ctx = int(o.get("model.max_seq_len", native))
        assert ctx * int(o.get("train.batch_size", batch)) == native * batch
        assert p.arm == f"context {ctx}"
    assert {p.arm for p in runs} == {"context 32", "context 64", "context 128"}
    with pytest.raises(QkvlabError, match="context 48 must be at least 2 and divide"):
        context_length.plan(tmp_path, [0], contexts=[48])
    with pytest.raises(QkvlabError, match="language-modelling task"):
        context_length.plan(tmp_path, [0], tasks=["mnist"])


def test_positions_arms_set_the_positions_after_the_users_overrides(tmp_path):
    runs = positions.plan(tmp_path, [0, 1], overrides=["model.positions=rotary", "optim.lr=1e-3"])
    assert len(runs) == 3 * 3 * 2  # arms x variants x seeds
    for p in runs:
        o = dict(x.split("=", 1) for x in p.run.overrides)  # the later override wins, as in the config
        assert o["optim.lr"] == "1e-3"
        assert o["model.positions"] == ("learned" if p.arm == positions.LEARNED else "rotary")
        assert o.get("model.rotary_values") == ("true" if p.arm == positions.ROTARY_VALUES else None)
    assert {p.run.variant for p in runs} == {"QKV", "Q-K=V", "Q-MQA"}
    assert positions.NAME not in STUDY  # an extension, not in the study's two hours
    with pytest.raises(QkvlabError, match="positions experiment needs a language-modelling task"):
        positions.plan(tmp_path, [0], tasks=["mnist"])


def test_scale_sizes_and_bad_sizes(tmp_path):
    runs = scale.plan(tmp_path, [0], sizes=["2x64", "2x128"])
    assert {p.arm for p in runs} == {"size 2x64", "size 2x128"}
    assert all(p.run.overrides == () for p in runs if p.arm == "size 2x128")  # the task's own size
    with pytest.raises(QkvlabError, match="LAYERSxD_MODEL"):
        scale.parse_size("wide")
    with pytest.raises(QkvlabError, match="multiple of the task's 8 heads"):
        scale.plan(tmp_path, [0], sizes=["2x100"])


def test_study_trains_shared_runs_once(tmp_path):
    runs = plan_study(tmp_path, [0, 1, 2], STUDY)
    dirs = {p.run.run_dir for p in runs}
    assert len(dirs) < len(runs)
    core_lm = {p.run.run_dir for p in runs if p.experiment == "core" and p.run.task == "shakespeare-char"}
    for experiment, arm in [("context-length", "context 64"), ("scale", "size 2x128"),
                            ("iso-parameter", "same architecture")]:
        shared = {p.run.run_dir for p in runs if p.experiment == experiment and p.arm == arm}
        assert shared and shared <= core_lm, experiment
    # a directory planned for something else is refused, not overwritten
    write_plan(tmp_path, runs, {})
    other = plan_study(tmp_path, [0], ["core"], overrides=["optim.lr=1e-3"])
    with pytest.raises(QkvlabError, match="planned for a different run"):
        write_plan(tmp_path, other, {})
    assert len(read_plan(tmp_path)) == len(runs)


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_core_and_iso_parameter_end_to_end_on_a_tiny_budget(tmp_path):
    out = tmp_path / "study"
    assert main(["experiment", "core", "--tasks", "reverse-16", "--variants", "QKV,Q-K=V", "--seeds", "0,1",
                 "--preset", "tiny", "--out", str(out), "--jobs", "2"]) == 0
    data = _report(out)["experiments"]["core"]["tasks"]["reverse-16"]
    assert data["variants"]["QKV"]["n_seeds"] == 2
    assert data["variants"]["Q-K=V"]["ci95_delta_pct"] is not None
    assert (out / "core" / "report.md").is_file()
    # the same directory, another experiment: core's QKV and Q-K=V runs are reused, not retrained
    before = (out / "core" / "reverse-16" / "QKV" / "seed0" / "summary.json").stat().st_mtime
    assert main(["experiment", "iso-parameter", "--tasks", "reverse-16", "--variants", "Q-K=V", "--seeds", "0,1",
                 "--preset", "tiny", "--out", str(out), "--jobs", "2"]) == 0
    iso = _report(out)["experiments"]["iso-parameter"]["reverse-16"]["Q-K=V"]
    assert iso["iso_parameter"]["n_seeds"] == 2 and iso["iso_parameter"]["d_mlp"]
    qkv = _report(out)["experiments"]["iso-parameter"]["reverse-16"]["QKV"]["params"]
    assert abs(iso["iso_parameter"]["params"] - qkv) <= 0.01 * qkv < abs(iso["same_architecture"]["params"] - qkv)
    assert (out / "core" / "reverse-16" / "QKV" / "seed0" / "summary.json").stat().st_mtime == before


@pytest.mark.slow
def test_context_length_scale_and_analysis_end_to_end_on_a_tiny_budget(tmp_path, fetched):
    fetched("shakespeare")
    out = tmp_path / "exp"
    assert main(["experiment", "context-length", "--contexts", "16,32", "--variants", "QKV,Q-K=V", "--seeds", "0",
                 "--preset", "tiny", "--out", str(out), "--jobs", "2"]) == 0
    ctx = _report(out)["experiments"]["context-length"]["shakespeare-char"]
    assert set(ctx) == {"context 16", "context 32"}
    assert ctx["context 16"]["Q-K=V"]["delta_vs_qkv_pct"] is not None
    assert (out / "plots" / "context-length.png").is_file()
    out2 = tmp_path / "scale"
    assert main(["experiment", "scale", "--sizes", "1x16,1x32", "--variants", "QKV,Q-K=V", "--seeds", "0",
                 "--preset", "tiny", "--out", str(out2), "--jobs", "2"]) == 0
    sizes = _report(out2)["experiments"]["scale"]["shakespeare-char"]
    assert set(sizes) == {"size 1x16", "size 1x32"}
    assert sizes["size 1x16"]["QKV"]["params"] < sizes["size 1x32"]["QKV"]["params"]
    assert main(["experiment", "analysis", str(out2)]) == 0
    analysis = json.loads((out2 / "analysis" / "analysis.json").read_text())
    layers = next(iter(analysis["tables"].values()))["Q-K=V"]
    assert layers[0]["cos_kv"] == pytest.approx(1.0, abs=1e-4)  # one tensor serves as K and V
    assert main(["experiment", "analysis", str(out2)]) == 2  # never replaces an analysis without --force


@pytest.mark.slow
def test_positions_end_to_end_on_a_tiny_budget(tmp_path, fetched):
    fetched("shakespeare")
    out = tmp_path / "pos"
    assert main(["experiment", "positions", "--variants", "QKV,Q-K=V", "--seeds", "0,1", "--preset", "tiny",
                 "--out", str(out), "--jobs", "2"]) == 0
    data = _report(out)["experiments"]["positions"]
    assert set(data["by_arm"]["shakespeare-char"]) == {"learned", "rotary", "rotary values"}
    assert data["by_arm"]["shakespeare-char"]["rotary values"]["Q-K=V"]["delta_vs_qkv_pct"] is not None
    cross = data["rotary_values_vs_rotary"]["shakespeare-char"]["Q-K=V"]
    assert cross["rotary"]["n_seeds"] == cross["rotary_values"]["n_seeds"] == 2 and cross["ci95_delta_pct"]
    configs = sorted((out / "positions" / "rotary_values").rglob("config.yaml"))
    assert len(configs) == 4 and all("rotary_values: true" in c.read_text() for c in configs)
    report = (out / "report.md").read_text()
    assert "Rotary values against plain rotary" in report
    rows = [line for line in report.splitlines() if line.startswith("| shakespeare-char | rotary values |")]
    assert len(rows) == 1 and rows[0].count("|") == 5  # four columns, as the header: the variants share one


@pytest.mark.parametrize(("argv", "match"), [
    (["experiment", "scale", "--sizes", "two"], "LAYERSxD_MODEL"),
    (["experiment", "context-length", "--contexts", "x"], "integers"),
    (["experiment", "core", "--preset", "huge"], "--preset 'huge'"),
    (["experiment", "core", "--variants", "Q=Z"], "Q=Z"),
    (["experiment", "core", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_experiment_options_are_one_line_errors(tmp_path, capsys, argv, match):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkvlab: error:") and err.count("\n") == 1 and match in err
    assert not (tmp_path / "x").exists()
