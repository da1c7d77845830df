"""The command line: overrides, and bad input answered by one line, exit status 2, nothing written."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from experiments.config import ConfigError
from experiments.train import main, parse

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_overrides_reach_every_section():
    config = parse(["--config", "smoke", "--model.d-model", "48", "--optimizers.1.rank", "4",
                    "--optimizers.1.projector", "dct", "--mesh.fsdp", "2", "--seed", "7",
                    "--data.paths", "a.txt", "b.txt", "--log.no-progress"])
    assert config.name == "smoke" and config.seed == 7 and config.model.d_model == 48
    assert config.optimizers[1].rank == 4 and config.optimizers[1].display_name == "galore-dct"
    assert config.mesh.fsdp == 2 and config.data.paths == ("a.txt", "b.txt")
    assert not config.log.progress
    assert parse([]).name == "default"
    assert [o.display_name for o in parse(["--config", "sweep"]).optimizers] == [
        "adamw", "galore-svd", "galore-dct", "galore-random", "fira-svd", "apollo-random",
        "apollo_mini", "frugal-block", "q_galore", "mezo"]


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "unknown config 'nope'"),
    (["--config", "smoke", "--model.widht", "3"], "--model.widht"),
    (["--config", "smoke", "--seed", "x"], "--seed"),
    (["--config", "smoke", "--optimizers.0.name", "sgd"], "'sgd'"),
    (["--config", "smoke", "--mesh.data", "3"], "mesh: data=3"),
    (["--config", "smoke", "--mesh.data", "8", "--data.batch-size", "12"], "batch shards"),
    (["--config", "smoke", "--data.batch-size", "6", "--schedule.grad-accum", "4"], "grad_accum"),
    (["--config", "smoke", "--optimizers.1.rank", "64"], "rank=64"),
    (["--config", "smoke", "--model.num-heads", "3"], "model: d_model=32"),
    (["--config", "smoke", "--data.source", "text"], "needs data.paths"),
    (["--config", "smoke", "--schedule.step", "10"], "did you mean --schedule.steps?"),
    (["--config", "smoke", "--optimizers.0.rank", "4"],
     "optimizers.0 is adamw, which has no rank (recipes with it: galore, fira, apollo, q_galore)"),
    (["--config", "smoke", "--optimizers.5.name", "mezo"],
     "the config has 4 optimizer(s); add new ones in order, from --optimizers.4.name"),
    (["--config", "smoke", "--optimizers.3.weight-bits", "4"], "--optimizers.3.weight-bits"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message, tmp_path, capsys):
    assert main([*args, "--log.output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())


def test_help_shows_each_slot_with_its_recipe_fields_only(capsys):
    """One line per field (-H for the descriptions), no reST markup, and each optimizer slot
    lists its own recipe's fields: adamw has no rank, galore no zo_eps."""
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and len(out.splitlines()) < 160, len(out.splitlines())
    assert "``" not in out and ":class:" not in out and ":mod:" not in out
    slot0 = out[out.index("optimizers.0 options"):out.index("optimizers.1 options")]
    slot1 = out[out.index("optimizers.1 options"):out.index("data options")]
    assert "--optimizers.0.adam-bits" in slot0 and "rank" not in slot0
    assert "--optimizers.1.rank" in slot1 and "--optimizers.1.projector" in slot1
    assert "zo-eps" not in out and "density" not in out


def test_optimizers_are_added_and_replaced_from_the_command_line():
    config = parse(["--config", "smoke", "--optimizers.4.name", "mezo",
                    "--optimizers.4.zo-samples", "2", "--optimizers.5.learning-rate", "1e-3",
                    "--optimizers.0.name", "apollo_mini", "--optimizers.1.name=galore",
                    "--optimizers.1.rank", "4"])
    names = [(type(o).__name__, o.display_name) for o in config.optimizers]
    assert names == [("ApolloMiniConfig", "apollo_mini"), ("GaLoreConfig", "galore-svd"),
                     ("GaLoreConfig", "galore-svd-layerwise"),
                     ("QGaLoreConfig", "q_galore-int8-layerwise"), ("MezoConfig", "mezo"),
                     ("AdamWConfig", "adamw")]
    smoke = parse(["--config", "smoke"])
    assert config.optimizers[0].scale == 128.0  # the recipe's own default, not the slot's
    assert config.optimizers[1] == dataclasses.replace(smoke.optimizers[1], rank=4)  # kept
    assert config.optimizers[4].zo_samples == 2 and config.optimizers[5].learning_rate == 1e-3


def test_a_run_config_of_the_flat_format_still_loads(tmp_path):
    """Run directories written before the per-recipe classes hold every recipe's fields in each
    optimizer; the other recipes' fields are dropped, an unknown one is an error."""
    import json

    from experiments.config import to_json_dict

    from experiments.config import (fingerprint_differences, normalized_fingerprint,
                                    resume_fingerprint)

    smoke = parse(["--config", "smoke"])
    flat = {**to_json_dict(smoke.optimizers[1]), "zo_eps": 1e-3, "density": 0.25,
            "subspace": "svd", "scale": None, "projector": None}  # null: "the recipe's default"
    data = {**to_json_dict(smoke), "optimizer": flat}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert parse(["--config", str(tmp_path / "config.json")]).optimizers == smoke.optimizers[1:2]
    # a checkpoint written with the flat optimizer resumes under the recipe class
    saved = {**resume_fingerprint(smoke, smoke.optimizers[1]), "optimizer": flat}
    assert fingerprint_differences(saved, resume_fingerprint(smoke, smoke.optimizers[1]))
    assert not fingerprint_differences(normalized_fingerprint(saved),
                                       resume_fingerprint(smoke, smoke.optimizers[1]))
    data["optimizer"]["rnak"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="rnak"):
        parse(["--config", str(tmp_path / "config.json")])


def test_parse_raises_config_error():
    with pytest.raises(ConfigError, match="Unrecognized"):
        parse(["--nope"])


@pytest.mark.slow
def test_cli_exit_status_in_a_subprocess(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.train", "--config", "missing"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown config 'missing'; available: default, int8_quality, memory_7b, quality, "
        "smoke, sweep"]



@pytest.mark.slow
def test_rerunning_a_saved_run_config_reproduces_its_metrics(tmp_path):
    """``--config <run>/config.json`` rebuilds the run (only its optimizer) and, on CPU, gives the
    same losses at every step."""
    from experiments import metrics, run
    from experiments.train import run_experiment

    args = ["--config", "smoke", "--select", "adamw", "--schedule.steps", "6", "--eval.every", "3",
            "--checkpoint.every", "0", "--log.no-progress", "--log.no-plots"]
    first = parse([*args, "--log.output-dir", str(tmp_path / "a")])
    run_experiment(first)
    directory = run.run_dir(first, first.optimizers[0])
    again = parse(["--config", str(directory / "config.json"), "--log.output-dir", str(tmp_path / "b")])
    assert [o.display_name for o in again.optimizers] == ["adamw"]
    run_experiment(again)
    losses = [(r["step"], r["split"], r["loss"]) for r in metrics.read(directory / "metrics.jsonl")]
    rerun = run.run_dir(again, again.optimizers[0]) / "metrics.jsonl"
    assert [(r["step"], r["split"], r["loss"]) for r in metrics.read(rerun)] == losses
    assert len(losses) == 8  # 6 train records and 2 evaluations


def test_a_bad_run_config_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text('{"seed": 0}')
    with pytest.raises(ConfigError, match="optimizer"):
        parse(["--config", str(tmp_path / "config.json")])


def _tfrecords(path):
    """The records of a TFRecord file (8-byte length, 4-byte crc, data, 4-byte crc)."""
    import struct

    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        out.append(data[i + 12:i + 12 + length])
        i += 12 + length + 4
    return out


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path):
    from tensorboardX.proto import event_pb2

    from experiments import metrics, run
    from experiments.train import run_experiment

    config = parse(["--config", "smoke", "--select", "adamw", "--schedule.steps", "4",
                    "--eval.every", "2", "--checkpoint.every", "0", "--log.no-progress",
                    "--log.no-plots", "--log.tensorboard", "--log.output-dir", str(tmp_path)])
    run_experiment(config)
    directory = run.run_dir(config, config.optimizers[0])
    scalars = {}
    for path in (directory / "tensorboard").iterdir():
        for record in _tfrecords(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    for r in metrics.read(directory / "metrics.jsonl"):
        assert scalars[(f"{r['split']}/loss", r["step"])] == pytest.approx(r["loss"], rel=1e-6)
    assert ("train/step_time", 4) in scalars and ("val/loss", 2) in scalars
