"""The memory planner: the trainer's exact step compiled shape-only, its table, JSON and plot."""

import dataclasses
import json

import pytest

from experiments import configs, memory
from experiments.config import ConfigError, OptimizerConfig
from experiments.train import parse

KEYS = {"label", "peak_bytes", "params_bytes", "optimizer_state_bytes", "grads_bytes",
        "temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "compile_seconds"}


@pytest.fixture(scope="module")
def smoke_rows():
    config = configs.load("smoke")
    config = dataclasses.replace(config, optimizers=(
        *config.optimizers, OptimizerConfig(name="mezo", learning_rate=1e-4)))
    return memory.plan(config)


@pytest.mark.slow
def test_rows_are_the_compiled_steps(smoke_rows):
    adamw, galore, layerwise, int8, mezo = smoke_rows
    assert [r["label"] for r in smoke_rows] == ["adamw", "galore-svd", "galore-svd-layerwise",
                                                "q_galore-int8-layerwise", "mezo"]
    # the same recipe state; the standard row's guard adds its int32 skip count
    assert galore["optimizer_state_bytes"] - layerwise["optimizer_state_bytes"] == 4
    assert layerwise["grads_bytes"] == galore["grads_bytes"]  # one layer: its gradient is all
    for r in smoke_rows:
        assert KEYS <= set(r)
        assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                   + r["temp_bytes"])
        if r is not int8:
            assert r["params_bytes"] == adamw["params_bytes"] > 0
    # INT8 kernels: smaller parameters, gradients of the float view (one layer: all of them)
    assert int8["params_bytes"] < adamw["params_bytes"]
    assert int8["grads_bytes"] == adamw["grads_bytes"]
    assert adamw["optimizer_state_bytes"] > galore["optimizer_state_bytes"]
    assert adamw["grads_bytes"] == adamw["params_bytes"] and mezo["grads_bytes"] == 0
    assert mezo["optimizer_state_bytes"] < 100  # a key and a count
    text = memory.table(smoke_rows, "smoke")
    assert "| galore-svd |" in text and "peak / adamw" in text and "1.000x" in text


def test_layerwise_rows_count_one_layer_of_gradients():
    import jax
    import jax.numpy as jnp

    params = {"embed": jax.ShapeDtypeStruct((10, 4), jnp.float32),
              "blocks": {"w": jax.ShapeDtypeStruct((3, 4, 4), jnp.float32)}}
    row = OptimizerConfig(name="galore")
    assert memory.gradient_bytes(params, row) == 4 * (40 + 48)
    assert memory.gradient_bytes(params, dataclasses.replace(row, layerwise=True)) == 4 * (40 + 16)
    assert memory.gradient_bytes(params, OptimizerConfig(name="mezo")) == 0


@pytest.mark.slow
def test_cli_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "memory.png"
    assert memory.main(["--config", "smoke", "--json", "--plot", str(plot),
                        "--select", "galore-svd"]) == 0
    rows = json.loads(capsys.readouterr().out)  # one document
    assert len(rows) == 1 and rows[0]["label"] == "galore-svd" and KEYS <= set(rows[0])
    assert memory.main(["--config", "smoke", "--jsonl", "--select", "adamw", "galore-svd"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()  # JSON Lines, a row per line
    assert [json.loads(line)["label"] for line in lines] == ["adamw", "galore-svd"]
    assert plot.stat().st_size > 1000
    assert memory.main(["--config", "smoke", "--model.widht", "3"]) == 2
    assert "error:" in capsys.readouterr().err


def test_at_preset_uses_the_papers_setting():
    config = memory.at_preset(parse([]), "llama_7b")
    assert (config.model.d_model, config.model.num_layers, config.model.ffn_dim) == (4096, 32, 11008)
    assert config.model.param_dtype == "float32" and config.model.remat == "none"
    assert (config.data.batch_size, config.data.seq_len, config.schedule.grad_accum) == (1, 256, 1)
    adamw, adamw_lw, galore, galore_lw = config.optimizers
    assert galore.rank == 1024 and galore.label == "galore-svd" and adamw.label == "adamw"
    assert galore_lw == dataclasses.replace(galore, layerwise=True, label="galore-svd-layerwise")
    assert adamw_lw.layerwise and adamw_lw.label == "adamw-layerwise"
    assert memory.at_preset(parse([]), "llama_1b").optimizers[2].rank == 512
    with pytest.raises(ConfigError, match="unknown model preset"):
        memory.at_preset(parse([]), "llama_9b")


def test_named_configs():
    m7 = configs.load("memory_7b")
    assert [o.display_name for o in m7.optimizers] == [
        "adamw", "adamw-8bit", "galore", "galore-8bit", "galore-8bit-layerwise",
        "apollo-mini-layerwise", "q-galore-int8-layerwise", "apollo-mini-int8-layerwise", "mezo"]
    assert [(o.weight_bits, o.weight_group_size) for o in m7.optimizers[6:8]] == [(8, 256),
                                                                               (8, 128)]
    assert m7.model.d_model == 4096 and m7.data.batch_size * m7.data.seq_len == 256
    assert parse([]).memory_presets == ("llama_1b", "llama_7b")
    with pytest.raises(ConfigError, match="memory_presets"):
        memory.plan(dataclasses.replace(configs.load("smoke"), memory_presets=("nope",)))
    with pytest.raises(TypeError, match="'layerwise'"):  # a gradient-recipe field
        OptimizerConfig(name="mezo", layerwise=True)
    with pytest.raises(TypeError, match="'weight_bits'"):
        OptimizerConfig(name="mezo", weight_bits=8)
    with pytest.raises(ConfigError, match="weight_group_size=100 must divide"):
        memory.plan(dataclasses.replace(configs.load("smoke"), optimizers=(
            OptimizerConfig(name="galore", weight_bits=8, weight_group_size=100),)))
    with pytest.raises(TypeError, match="'adam_bits'"):  # frugal's moments are float
        OptimizerConfig(name="frugal", adam_bits=8)
