"""`qkvlab experiment conversion`: end to end on the tiny budget, resuming, its table, bad input."""

import json

import pytest

from qkvlab.cli.main import main
from qkvlab.errors import QkvlabError
from qkvlab.experiments.conversion import ConversionSpec, aggregate, markdown_table, prepare_out


def _rows(spec):
    """Synthetic measurements: source 10, converted 20, uptrained 12 - f, scratch 13 - f (+ seed / 10)."""
    rows = [{"seed": s, "variant": "QKV", "init": None, "stage": "source", "fraction": 0.0, "perplexity": 10 + s / 10}
            for s in spec.seeds]
    for s in spec.seeds:
        for v in spec.variants:
            for i in spec.inits_for(v):
                rows.append({"seed": s, "variant": v, "init": i, "stage": "converted", "fraction": 0.0,
                             "perplexity": 20 + s / 10})
                rows += [{"seed": s, "variant": v, "init": i, "stage": "uptrained", "fraction": f,
                          "perplexity": 12 - f + s / 10} for f in spec.fractions]
            rows += [{"seed": s, "variant": v, "init": None, "stage": "scratch", "fraction": f,
                      "perplexity": 13 - f + s / 10} for f in spec.fractions]
    return rows


def test_table_has_a_row_per_init_and_scratch_at_the_same_total_budget():
    spec = ConversionSpec(seeds=(0, 1, 2), variants=("Q-K=V", "GQA-4"), fractions=(0.05, 0.2))
    cells = aggregate(_rows(spec), spec, "perplexity")
    table = markdown_table(cells, spec, "perplexity", False, {"steps": 400})
    lines = table.splitlines()
    assert lines[0].startswith("| target | initialisation | converted (+0 steps) | +5 % uptraining (+20 steps) | "
                               "+20 % uptraining (+80 steps) |")
    assert "| QKV (source, 400 steps) | – | 10.100 ± 0.100 | – | – |" in lines
    assert "| Q-K=V | keep K | 20.100 ± 0.100 | 12.050 ± 0.100 (-7.7 % [-7.8, -7.5]) | " \
           "11.900 ± 0.100 (-7.8 % [-7.9, -7.6]) |" in lines
    assert "| Q-K=V | from scratch, same total steps | – | 13.050 ± 0.100 (420 steps) | 12.900 ± 0.100 (480 steps) |" \
        in lines
    # GQA-4 keeps K and V apart: keep K / keep V would equal the mean, so only mean and lsq run
    assert [ln.split(" | ")[1] for ln in lines if ln.startswith("| GQA-4 |")] == \
        ["mean", "lsq (calibrated)", "from scratch, same total steps"]


@pytest.mark.parametrize("kwargs, match", [
    ({"variants": ("QKV",)}, "shares no key/value"),
    ({"variants": ("Q=K-V",)}, "shares no key/value"),
    ({"variants": ("nope",)}, "nope"),
    ({"inits": ("max",)}, "initialisation 'max'"),
    ({"fractions": (0.0,)}, "fraction"),
    ({"fractions": (float("nan"),)}, "fraction"),
    ({"seeds": ()}, "seeds"),
    ({"seeds": (1, 1)}, "repeat"),
    ({"calibration_windows": 0}, "calibration_windows"),
    ({"source": "/nonexistent/run"}, "not a run directory"),
])
def test_bad_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(QkvlabError, match=match):
        ConversionSpec(**kwargs)


def test_out_is_resumed_with_the_same_settings_and_kept_otherwise(tmp_path):
    spec = ConversionSpec(seeds=(0,))
    out = tmp_path / "x"
    prepare_out(out, spec, force=False)
    (out / "runs").mkdir()
    assert prepare_out(out, spec, force=False) == out and (out / "runs").is_dir()  # same spec: resumed
    other = ConversionSpec(seeds=(1,))
    with pytest.raises(QkvlabError, match="other settings.*--force"):
        prepare_out(out, other, force=False)
    assert (out / "runs").is_dir()
    prepare_out(out, other, force=True)
    assert not (out / "runs").exists() and json.loads((out / "experiment.json").read_text())["seeds"] == [1]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(QkvlabError, match="other files"):
        prepare_out(foreign, spec, force=False)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for argv in (["--uptrain", "x"], ["--preset", "huge"], ["--variants", "QKV"], ["--seeds", "2-1"],
                 ["--task", "nope"]):
        assert main(["experiment", "conversion", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qkvlab: error:") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tiny_conversion_experiment_end_to_end_and_resumed(tmp_path, fetched, capsys):
    fetched("shakespeare")
    out = tmp_path / "exp"
    argv = ["experiment", "conversion", "--preset", "tiny", "--seeds", "0-1", "--variants", "Q-K=V",
            "--inits", "mean,lsq", "--uptrain", "20%", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "conversion.json").read_text())
    md = (out / "conversion.md").read_text()
    stages = sorted({(r["stage"], r["init"]) for r in data["rows"]}, key=str)
    assert stages == sorted({("source", None), ("converted", "mean"), ("converted", "lsq"), ("uptrained", "mean"),
                             ("uptrained", "lsq"), ("scratch", None)}, key=str)
    assert len(data["rows"]) == 2 * 6
    scratch = [r for r in data["rows"] if r["stage"] == "scratch"]
    assert {r["steps"] for r in scratch} == {30 + 6}  # tiny: N = 30 steps, +20 % = 6 more
    assert all(r["perplexity"] > 1 for r in data["rows"])
    up = next(c for c in data["cells"] if c["stage"] == "uptrained" and c["init"] == "lsq")
    assert up["n"] == 2 and up["ci95"] is not None
    assert data["command"].startswith("qkvlab experiment conversion --task shakespeare-char --preset tiny --seeds 0,1")
    assert "| Q-K=V | lsq (calibrated) |" in md and data["command"] in md
    # a rerun with the same settings trains nothing and writes the same numbers
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads((out / "conversion.json").read_text())
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in data["rows"]]
    assert "resumed" not in capsys.readouterr().out


def _rv_rows(spec):
    """_rows with every target row once per rotary-values setting; rotary values 1 lower after uptraining."""
    rows = []
    for r in _rows(spec):
        if r["stage"] == "source":
            rows.append(r)
            continue
        for rv in spec.rotary_values:
            bump = -1 if rv and r["stage"] != "converted" else 0
            rows.append({**r, "rotary_values": rv, "perplexity": r["perplexity"] + bump})
    return rows


def test_table_has_rotary_value_targets_beside_plain_ones():
    spec = ConversionSpec(seeds=(0, 1), variants=("Q-K=V",), inits=("mean",), fractions=(0.2,),
                          positions="rotary", rotary_values=(True, False))
    assert spec.rotary_values == (False, True) and spec.targets() == [("Q-K=V", False), ("Q-K=V", True)]
    cells = aggregate(_rv_rows(spec), spec, "perplexity")
    lines = markdown_table(cells, spec, "perplexity", False, {"steps": 400}).splitlines()
    assert [ln.split(" | ")[0:2] for ln in lines[3:7]] == [
        ["| Q-K=V", "mean"], ["| Q-K=V", "from scratch, same total steps"],
        ["| Q-K=V, rotary values", "mean"], ["| Q-K=V, rotary values", "from scratch, same total steps"]]
    assert "| Q-K=V, rotary values | from scratch, same total steps | – | 11.850 ± 0.071 (480 steps) |" in lines
    assert "| Q-K=V | from scratch, same total steps | – | 12.850 ± 0.071 (480 steps) |" in lines


def test_rows_without_rotary_values_read_as_plain():
    """Rows stored before the setting existed carry no rotary_values: they aggregate as plain targets."""
    spec = ConversionSpec(seeds=(0, 1), variants=("Q-K=V",), inits=("mean",), fractions=(0.2,))
    old = aggregate(_rows(spec), spec, "perplexity")
    assert [c["mean"] for c in old] == [c["mean"] for c in aggregate(_rv_rows(spec), spec, "perplexity")]


@pytest.mark.parametrize("kwargs, match", [
    ({"rotary_values": (True,)}, "need rotary sources"),
    ({"rotary_values": (True,), "positions": "learned"}, "need rotary sources"),
    ({"positions": "alibi"}, "positions 'alibi'"),
    ({"rotary_values": ()}, "rotary_values"),
    ({"rotary_values": ("on",)}, "rotary_values"),
])
def test_bad_rotary_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(QkvlabError, match=match):
        ConversionSpec(**kwargs)


def test_spec_without_rotary_settings_matches_one_stored_before_them(tmp_path):
    """An experiment directory written before positions / rotary values existed still resumes."""
    spec = ConversionSpec(seeds=(0,))
    assert "positions" not in spec.to_dict() and "rotary_values" not in spec.to_dict()
    rotary = ConversionSpec(seeds=(0,), positions="rotary", rotary_values=(False, True)).to_dict()
    assert rotary["positions"] == "rotary" and rotary["rotary_values"] == [False, True]


def test_cli_rotary_values_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for argv, match in ((["--rotary-values", "yes"], "--rotary-values 'yes' is not off or on"),
                        (["--rotary-values", "on"], "need rotary sources"),
                        (["--positions", "rotary", "--source", str(tmp_path)], "not a run directory")):
        assert main(["experiment", "conversion", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_tiny_conversion_to_rotary_values_end_to_end(tmp_path, fetched):
    """A rotary source converted with rotary values: the converted model, its uptraining and the scratch run all
    have them; the table names the target."""
    from qkvlab.models.io import load_model, saved_model_config

    fetched("shakespeare")
    out = tmp_path / "exp"
    assert main(["experiment", "conversion", "--preset", "tiny", "--seeds", "0", "--variants", "Q-MQA",
                 "--inits", "mean", "--uptrain", "0.1", "--positions", "rotary", "--rotary-values", "on",
                 "--out", str(out)]) == 0
    data = json.loads((out / "conversion.json").read_text())
    assert data["budget"]["positions"] == "rotary"
    assert "--positions rotary --rotary-values on" in data["command"]
    by_stage = {r["stage"]: r for r in data["rows"]}
    assert load_model(by_stage["source"]["run_dir"]).config.rotary_values is False
    for stage in ("converted", "uptrained", "scratch"):
        assert by_stage[stage]["rotary_values"] is True
        config = saved_model_config(by_stage[stage]["run_dir"])
        assert config.rotary_values and config.positions == "rotary" and config.variant == "Q-MQA", stage
    assert "| Q-MQA, rotary values | mean |" in (out / "conversion.md").read_text()
