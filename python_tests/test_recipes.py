"""Each method's recipe: the option values it takes when none is given.

A flag, a config file and a resumed run's recorded values each win over the recipe;
config.yaml records the resolved values and which came from the recipe; the recipes
are the configurations of the experiments behind docs/results.md; --help and
--show-config show them.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from lbkernels.train.__main__ import main
from lbkernels.train.cli import FROM_RECIPE, build_parser, parse_args, recipe_flags, resolved
from lbkernels.train.methods import METHODS, Context
from lbkernels.train.models import build_model


def test_every_method_has_a_recipe_of_existing_options():
    dests = {a.dest for a in build_parser()._actions}
    for name, method in METHODS.items():
        assert method.recipe, name
        assert set(method.recipe) <= dests, (name, set(method.recipe) - dests)


def test_a_recipe_naming_an_unknown_option_is_refused(monkeypatch):
    monkeypatch.setitem(METHODS, "sgd", dataclasses.replace(METHODS["sgd"], recipe={"learning_rate": 1}))
    with pytest.raises(ValueError, match="recipes name options that do not exist: \\['learning_rate'\\]"):
        build_parser()


@pytest.mark.parametrize("method", list(METHODS))
def test_options_not_given_come_from_the_recipe(method):
    args, _ = parse_args(["--method", method])
    recipe = METHODS[method].recipe
    for key, value in recipe.items():
        assert getattr(args, key) == (list(value) if isinstance(value, tuple) else value), key
    assert getattr(args, FROM_RECIPE) == sorted(recipe)


def test_a_flag_wins_over_the_recipe():
    args, _ = parse_args(["--method", "sgd", "--lr", "0.3", "--batch-size", "128"])
    assert (args.lr, args.batch_size, args.base_batch_size) == (0.3, 128, 360)
    assert "lr" not in args.from_recipe and "batch_size" not in args.from_recipe
    assert "base_batch_size" in args.from_recipe


def test_a_config_file_value_wins_over_the_recipe(tmp_path):
    # from_recipe in a file is a record of where its values came from; they are the
    # user's values now.
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: sgd\nlr: 0.3\nfrom_recipe: [lr, batch_size]\n")
    args, _ = parse_args(["--config", str(cfg)])
    assert (args.lr, args.batch_size) == (0.3, 360)
    assert "lr" not in args.from_recipe and "batch_size" in args.from_recipe


def test_a_bad_from_recipe_in_a_config_file_names_the_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("from_recipe: [lr, no_such_option]\n")
    with pytest.raises(ValueError, match="from_recipe: expected a list of option names"):
        parse_args(["--config", str(cfg)])


def test_recipe_decay_epochs_move_with_epochs():
    def decay(*flags):
        args, _ = parse_args(["--method", "sgd", *flags])
        return args.decay, args.decay_epochs

    assert decay() == ("step", [15, 23])  # of the recipe's 30 epochs
    assert decay("--epochs", "40") == ("step", [20, 31])  # 15 * 40 / 30, 23 * 40 / 30 = 30.7
    assert decay("--epochs", "2") == ("step", [1, 2])
    assert decay("--epochs", "1") == ("step", [1])  # no repeated milestone
    assert decay("--decay-epochs", "5") == ("step", [5])
    # A --decay of the user's: the recipe's milestones detail its own schedule, not that one.
    assert decay("--decay", "poly") == ("poly", [])
    assert decay("--decay", "step") == ("step", [])  # a constant rate after warm-up, as ever


def test_show_config_prints_the_resolved_options_without_training(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["--method", "growing-batch", "--lr", "0.1", "--show-config", "--out-dir", str(out)])
    assert e.value.code == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert not out.exists()
    args, _ = parse_args(["--method", "growing-batch", "--lr", "0.1", "--out-dir", str(out)])
    assert shown == resolved(args)
    assert shown["lr"] == 0.1 and shown["max_batch"] == 360 and shown["decay_epochs"] == [10, 20]
    assert "lr" not in shown[FROM_RECIPE] and "max_batch" in shown[FROM_RECIPE]


def test_help_shows_every_methods_recipe(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for name, method in METHODS.items():
        assert f"--method {name}: recipe: {recipe_flags(method.recipe)}" in text, name
    assert re.search(r"--lr LR .*\(default: the method's recipe, else 5\.0\)", text)


def _tiny_run(tmp_path, *flags):
    out = tmp_path / "run"
    assert main(["--method", "sgd", "--model", "mlp", "--width", "0.25", "--epochs", "1",
                 "--batch-size", "256", "--quiet", "--out-dir", str(out), *flags]) == 0
    return out


@pytest.mark.slow
def test_a_resumed_run_keeps_its_recorded_values_over_a_changed_recipe(tmp_path, monkeypatch):
    out = _tiny_run(tmp_path)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["lr"] == 1.0 and "lr" in recorded[FROM_RECIPE]
    assert "batch_size" not in recorded[FROM_RECIPE]
    # The recipe changes (a later version); the run continues with the values it had.
    changed = {**METHODS["sgd"].recipe, "lr": 0.7, "warmup_epochs": 1.0}
    monkeypatch.setitem(METHODS, "sgd", dataclasses.replace(METHODS["sgd"], recipe=changed))
    args, _ = parse_args(["--resume", str(out), "--epochs", "2"])
    assert (args.lr, args.warmup_epochs, args.epochs) == (1.0, 3.0, 2)
    assert args.from_recipe == recorded[FROM_RECIPE]  # still the recipe's, of that time
    args, _ = parse_args(["--resume", str(out), "--lr", "0.5"])
    assert args.lr == 0.5 and "lr" not in args.from_recipe


# The experiments behind each recipe, as their command lines (the bench scripts' flags):
# the recipe must resolve every option it sets to the experiment's value.
def _experiments():
    from bench.experiments import delayed, extrap, growing_batch, swap

    return {
        "sgd": extrap.RECIPE + extrap.SGD + ["--lr", "1"],
        "extrap-postlocal": extrap.RECIPE + extrap.POSTLOCAL + ["--lr", "2"],
        "growing-batch": growing_batch.RECIPE + ["--batch-schedule", "increase"],
        "async-sim": delayed.COMMON + delayed.RUNS["shifted-scaled"][0] + ["--epochs", "20"],
        "swap": swap.COMMON + swap.VARIANTS["swap"],
    }


@pytest.mark.parametrize("method", ["sgd", "extrap-postlocal", "growing-batch", "async-sim", "swap"])
def test_recipe_is_the_configuration_of_its_experiment(method):
    experiment, _ = parse_args(_experiments()[method])
    assert experiment.method == method
    ours, _ = parse_args(["--method", method])
    for key in METHODS[method].recipe:
        assert getattr(ours, key) == getattr(experiment, key), key


def test_swa_default_start_leaves_a_tail_in_a_two_epoch_run():
    args, _ = parse_args(["--method", "swa", "--epochs", "2"])
    model = build_model("mlp", (1, 8, 8), 10, 0.25)
    plan = METHODS["swa"].build(Context(args, model, lambda b: 10, rank=0, world_size=1))
    assert plan.start == 10  # after epoch 1 of 2 (three quarters would be epoch 2: no tail)
    assert plan.every == 10  # one average per epoch of the tail
