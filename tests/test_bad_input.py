"""Bad input ends with one clear line on stderr and exit code 2, before any training starts."""

import json

import pytest

from dpfl.cli import main

TINY = ["--model", "tiny", "--num-devices", "4", "--cohort-size", "2", "--rounds", "1"]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.fixture
def good_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "train.jsonl", [{"text": f"turn on light {i}", "label": "on"} for i in range(6)] + [{"text": f"turn off light {i}", "label": "off"} for i in range(6)])
    _write(d / "test.jsonl", [{"text": "turn on the lamp", "label": "on"}, {"text": "turn off the lamp", "label": "off"}])
    return d


def run(capsys, args):
    code = main(["simulate", *TINY, *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_malformed_jsonl_names_file_and_line(capsys, good_dir, tmp_path):
    with open(good_dir / "train.jsonl", "a") as fh:
        fh.write('{"text": "broken", "label": \n')
    code, err = run(capsys, ["--data-dir", str(good_dir), "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert "train.jsonl:13" in err and err.startswith("dpfl: error:")


def test_missing_label_field(capsys, good_dir, tmp_path):
    with open(good_dir / "train.jsonl", "a") as fh:
        fh.write('{"text": "no label here"}\n')
    code, err = run(capsys, ["--data-dir", str(good_dir), "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "train.jsonl:13" in err and "label" in err


def test_label_in_test_unseen_in_train(capsys, good_dir, tmp_path):
    with open(good_dir / "test.jsonl", "a") as fh:
        fh.write('{"text": "dim it", "label": "dim"}\n')
    code, err = run(capsys, ["--data-dir", str(good_dir), "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "dim" in err and "test.jsonl" in err


def test_empty_data_set(capsys, good_dir, tmp_path):
    (good_dir / "train.jsonl").write_text("")
    code, err = run(capsys, ["--data-dir", str(good_dir), "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "train.jsonl" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--noise-multiplier", "-1"], "--noise-multiplier"),
        (["--target-delta", "1.0"], "--target-delta"),
        (["--cohort-size", "10"], "--cohort-size"),
        (["--activity-exponent", "-0.5"], "--activity-exponent"),
        (["--partitioner", "bogus"], "--partitioner"),
        (["--strategy", "bogus"], "--strategy"),
        (["--model", "./no/such/model"], "--model"),
    ],
)
def test_invalid_settings(capsys, tmp_path, args, needle):
    code, err = run(capsys, [*args, "--run-dir", str(tmp_path / "r")])
    assert code == 2, err
    assert needle in err


def test_run_dir_that_holds_a_run_is_refused(capsys, tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / "config.toml").write_text('run_id = "other"\n')
    code, err = run(capsys, ["--run-dir", str(rd)])
    assert code == 2 and "already holds a run" in err
    assert (rd / "config.toml").read_text() == 'run_id = "other"\n'  # nothing lost


def _no_run_left(rd):
    """Nothing that looks like a run (config.toml, ledger, metrics) is left behind."""
    return not any((rd / f).exists() for f in ("config.toml", "ledger.sqlite", "metrics.jsonl"))


def test_missing_text_field(capsys, good_dir, tmp_path):
    with open(good_dir / "train.jsonl", "a") as fh:
        fh.write('{"label": "on"}\n')
    code, err = run(capsys, ["--data-dir", str(good_dir), "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "train.jsonl:13" in err and "text" in err
    assert _no_run_left(tmp_path / "r")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--target-epsilon", "0.001", "--rounds", "50"], "--target-epsilon"),
        (["--fault-rate", "1.5"], "--fault-rate"),
        (["--fault-kind", "bogus"], "--fault-kind"),
        (["--round-timeout", "0"], "--round-timeout"),
        (["--dirichlet-alpha", "-1"], "--dirichlet-alpha"),
        (["--trainable", "top3"], "--trainable top3: tiny has 2 transformer layers"),
        (["--trainable", "encoder"], "--trainable"),
    ],
)
def test_more_invalid_settings_fail_before_ray(capsys, tmp_path, monkeypatch, args, needle):
    import flwr.simulation

    def no_ray(*a, **k):  # preflight must reject these before any process starts
        raise AssertionError("the simulation was started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", no_ray)
    code, err = run(capsys, [*args, "--run-dir", str(tmp_path / "r")])
    assert code == 2, err
    assert needle in err and err.startswith("dpfl: error:")
    assert _no_run_left(tmp_path / "r")


def test_device_with_no_examples_is_a_warning_not_an_error(tmp_path):
    from dpfl.commands.simulate import preflight
    from settings.config import RunConfig

    d = tmp_path / "data"
    d.mkdir()
    _write(d / "train.jsonl", [{"text": "turn on", "label": "on"}, {"text": "turn off", "label": "off"}, {"text": "lights on", "label": "on"}])
    _write(d / "test.jsonl", [{"text": "on", "label": "on"}, {"text": "off", "label": "off"}])
    cfg = RunConfig(
        model="tiny", num_devices=4, cohort_size=2, rounds=1, data_dir=str(d), run_dir=str(tmp_path / "r"), partitioner="quantity"
    ).validate()
    from partitions.population import build_population

    assert (build_population(cfg).activity() == 0).any()
    preflight(cfg)  # 3 examples over 4 devices: one device is empty, the run can go on (the server warns)


def test_resume_of_a_directory_without_a_run(capsys, tmp_path):
    code = main(["simulate", "--resume", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--resume" in err and "config.toml" in err


def test_resume_refuses_new_settings(capsys, tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / "config.toml").write_text('run_id = "x"\nmodel = "tiny"\n')
    code = main(["simulate", "--resume", str(rd), "--rounds", "9"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--rounds" in err and "--resume" in err


def _file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: ["--deletions", _file(d, "del.txt", "1 2\nnot a line\n")], "del.txt, line 2: expected 'DEVICE_ID ROUND'"),
        (lambda d: ["--deletions", str(d / "missing.txt")], "missing.txt: cannot read it"),
        (lambda d: ["--deletions", _file(d, "del.txt", "9 1\n")], "device 9 is not one of the run's devices 0..3"),
        (lambda d: ["--trainable", "lora", "--lora-targets", "nosuchmodule"], "--lora-targets ['nosuchmodule']"),
        (lambda d: ["--baseline-model", _file(d, "notes.txt", "not a checkpoint\n")], "--baseline-model"),
        (lambda d: ["--baseline-model", _file(d, "empty.pt", "")], "cannot load it into the run's model"),
        (lambda d: ["--allow-zero-noise"], "--allow-zero-noise: accepts a noise multiplier of 0"),
        (lambda d: ["--allow-zero-noise", "--noise-multiplier", "0.5"], "no noise multiplier of this run is 0"),
        (lambda d: ["--model", "nosuchorg/nosuchmodel"], "--model 'nosuchorg/nosuchmodel'"),
        (lambda d: ["--oos-label", "nosuch", "--oos-threshold", "0.5"], "--oos-label 'nosuch': not a label of"),
        (lambda d: ["--oos-holdout-intents", "0.3", "--holdout-per-device", "0.1"], "--oos-holdout-intents"),
        (lambda d: ["--oos-threshold", "0.5"], "--oos-threshold: needs out-of-scope test utterances"),
    ],
    ids=["deletions-bad-line", "deletions-missing", "deletions-unknown-device", "lora-targets", "baseline-text",
         "baseline-empty", "allow-zero-noise", "allow-zero-noise-with-noise", "unknown-hub-model", "oos-unknown-label",
         "oos-holdout-builtin", "oos-threshold-alone"],
)
def test_late_errors_end_before_any_run_directory(capsys, tmp_path, monkeypatch, make, needle):
    """Each of these once ended in a traceback or a clean line after Ray started and left a run
    directory behind: now one ``dpfl: error:`` line and exit 2 from the preflight."""
    import time

    import flwr.simulation

    def no_ray(*a, **k):
        raise AssertionError("the simulation was started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", no_ray)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the hub check itself must fail fast
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    t0 = time.monotonic()
    code, err = run(capsys, [*make(tmp_path), "--run-dir", str(tmp_path / "r")])
    assert code == 2, err
    assert needle in err and err.startswith("dpfl: error:"), err
    assert not (tmp_path / "r").exists()
    assert time.monotonic() - t0 < 15


def test_retrain_of_a_directory_without_a_run_names_the_command(capsys, tmp_path):
    code = main(["retrain", str(tmp_path), "--from-round", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("dpfl: error: dpfl retrain") and "--resume" not in err
