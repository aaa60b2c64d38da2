"""configs/*_mogrifier_paper.yaml say what deepmind/lamb's tuned trials say, setting by setting.

configs/lamb/*.yaml are lamb's two trial configs transcribed as data. Every lamb setting is accounted for here
once: it maps onto an lmcore setting (and the paper config must hold lamb's value, read in lmcore's units), or
its value is lmcore's only behaviour, or lmcore leaves it out (docs/paper_tools.md's table says why), or it is
about lamb's machinery (files, logging, TensorFlow). A setting lamb adds or a value it changes fails a test.
"""
import re
from pathlib import Path

import pytest
import yaml

from lmcore.config import flatten, make_config
from lmcore.models import count_parameters, solve_budget

ROOT = Path(__file__).resolve().parents[2]
VOCAB = {"ptb": 10_000, "wt2": 33_278}
VALID_LINES = {"ptb": 3_370, "wt2": 3_760}  # lines of the validation files, lamb's instances
TRIALS = {
    "ptb": ("ptb_trial_483.yaml",
            "lamb/experiment/mogrifier/config/786252db3825+_tune_ptb_24m_lstm_fm_d2_arms/trial_483/config"),
    "wt2": ("wt2_trial_747.yaml",
            "lamb/experiment/mogrifier/config/c51c838b33a5+_tune_wikitext-2_35m_lstm_mos2_fm_d2_arms/trial_747/config"),
}


def same(value, lamb, dataset):
    return value


# lamb setting -> (lmcore setting, lamb's value in lmcore's terms). `lamb` is the whole trial.
MEANS = {
    "num_params": ("model.params_budget", same),
    "share_input_and_output_embeddings": ("model.tie_weights", same),
    "input_embedding_ratio": ("model.embedding_ratio", same),
    "mos_num_components": ("model.softmax_mixtures", lambda v, lamb, ds: max(v, 1)),  # 0: one softmax
    "embedding_dropout": ("model.dropout.embedding", same),
    "input_dropout": ("model.dropout.input", same),
    "output_dropout": ("model.dropout.output", same),
    "downprojected_output_dropout": ("model.dropout.latent",
                                     lambda v, lamb, ds: lamb["output_dropout"] if v < 0 else v),
    "shared_mask_dropout": ("model.dropout.mask", lambda v, lamb, ds: "sequence" if v else "step"),
    "num_layers": ("model.layers", same),
    "feature_mask_rounds": ("model.rounds", same),
    "feature_mask_rank": ("model.rank", same),
    "inter_layer_dropout": ("model.dropout.inter", lambda v, lamb, ds: lamb["input_dropout"] if v < 0 else v),
    "state_dropout": ("model.dropout.state", same),
    # sum(w^2) / 2 against a loss summed over the window: per token, as lmcore's loss is, divided by its length
    "l2_penalty": ("optim.weight_decay", lambda v, lamb, ds: v / lamb["max_time_steps"]),
    "forget_bias": ("model.forget_bias", same),
    "steps_per_turn": ("train.steps_per_epoch", same),
    "print_training_stats_every_num_steps": ("train.log_interval", same),
    "turns": ("train.epochs", same),
    "optimizer_type": ("optim.name", lambda v, lamb, ds: {"rmsprop": "adam"}[v]),  # with beta1 0, see FIXED
    "rmsprop_beta2": ("optim.beta2", same),
    "batch_size": ("data.batch_size", same),
    "max_grad_norm": ("optim.clip", same),
    "max_time_steps": ("data.bptt", same),
    "trigger_averaging_turns": ("optim.asgd_nonmono", same),
    "trigger_averaging_at_the_latest": ("optim.asgd_latest", same),
    "learning_rate": ("optim.lr", same),
    "learning_rate_decay": ("optim.lr_decay", same),
    "min_non_episodic_eval_examples_per_stripe": (
        "data.eval_batch_size", lambda v, lamb, ds: min(lamb["batch_size"], VALID_LINES[ds] // v)),
    "eval_softmax_temperature": ("eval.logit_scale_search", lambda v, lamb, ds: -v if v < 0 else None),
    "eval_softmax_temperature_estimation_num_tokens": ("eval.logit_scale_tokens", same),
    "dyneval_learning_rate": ("eval.dynamic_lr", same),
    "dyneval_decay_rate": ("eval.dynamic_decay", same),
    "dyneval_epsilon": ("eval.dynamic_epsilon", same),
    "seed": ("train.seed", same),
}
# What lamb's code does with those settings, in settings of lmcore that have no lamb key of their own.
FIXED = {
    "model.family": "mogrifier",  # model lstm with feature_mask_rounds > 0
    "model.budget_rule": "within",  # lamb's _budget_hidden_size: the widest within num_params
    "data.variable_bptt": False,  # lamb's windows are max_time_steps long
    "data.random_offset": True,  # ... and its training streams start at random places
    "optim.beta1": 0.0,  # lamb's rmsprop is TensorFlow's Adam with beta1 0
    "optim.clip_unit": "window",  # the clip bounds the gradient of the loss summed over the window
    "optim.average": "asgd",  # trigger_averaging_turns >= 0: an arithmetic average of the weights
    "optim.asgd_trigger": "stale",  # ... once the best evaluation is that many turns old
    "eval.dynamic_decay_mean": "elements",  # lamb's dyneval.py normalises the decay by the mean over elements
    "eval.dynamic_bptt": 70,  # ... and steps after every max_time_steps window
}
# lamb settings whose value in these trials is what lmcore always does (no setting needed).
AS_LMCORE = {
    "word_based": True, "episodic": False, "input_embedding_size": -1, "output_embedding_size": -1,
    "output_embedding_ratio": -1.0, "token_dropout": 0.0, "embed_once": True, "model": "lstm",
    "residual_connections": False, "feature_mask": False, "sparsity_ratio": -1.0, "overlay_rank": -1,
    "hidden_size": [-1], "hidden_size_multiplier": 1.0, "layer_norm": False, "activation_fn": "tf.tanh",
    "tie_forget_and_input_gates": False, "trainable_initial_state": False, "state_dropout_flip_rate": 0.0,
    "update_dropout": 0.0, "cell_clip": -1.0, "model_average": "arithmetic", "num_training_samples": 1,
    "l1_penalty": 0.0, "activation_norm_penalty": 0.0, "rmsprop_epsilon": 1e-08, "accum_batch_size": -1,
    "learning_rate_decay_burn_in_steps": 0, "drop_learning_rate_turns": -1, "drop_learning_rate_multiplier": 1.0,
    "drop_learning_rate_at_the_latest": -1, "early_stopping_turns": -1, "early_stopping_rampup_turns": 0,
    "early_stopping_worst_xe_target": "", "early_stopping_slowest_rate": 0.0, "crossvalidate": False,
    "max_eval_eval_batches": -1, "max_test_eval_batches": -1, "eval_on_test": False,
    "eval_method": "deterministic", "num_eval_samples": 0, "eval_power_mean_power": 1.0,
    "eval_dropout_multiplier": 1.0, "dyneval": False, "save_checkpoints": True,
}
# lamb settings that lmcore leaves out on purpose (docs/paper_tools.md's table gives each a row and a reason).
LEFT_OUT = {
    "lstm_skip_connection": True, "cap_input_gate": True, "drop_state_probability": 0.01,
    "embedding_init_factor": 1.0, "scale_input_embeddings": False, "cell_init_factor": 1.0,
    "output_init_factor": 1.0, "max_training_eval_batches": 20,
}
# Unused by an rmsprop run, or about lamb's machinery rather than the model or its training.
NOT_THE_RECIPE = {"config_version", "file_encoding", "adam_beta1", "adam_beta2", "adam_epsilon",
                  "crossvalidation_folds", "crossvalidation_rounds", "validation_prediction_file", "swap_memory",
                  "log_device_placement", "summary_flush_secs"}


def trial(dataset: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "lamb" / TRIALS[dataset][0]).read_text())


def paper(dataset: str):
    return make_config({}, flatten(yaml.safe_load((ROOT / "configs" / f"{dataset}_mogrifier_paper.yaml").read_text())))


@pytest.mark.parametrize("dataset", TRIALS)
def test_the_transcription_names_its_source(dataset):
    name, source = TRIALS[dataset]
    header = (ROOT / "configs" / "lamb" / name).read_text().split("\n", 3)
    assert "github.com/deepmind/lamb/blob/" in header[1] and header[2].lstrip("# ") == source


@pytest.mark.parametrize("dataset", TRIALS)
def test_every_lamb_setting_is_accounted_for_once(dataset):
    groups = [set(MEANS), set(AS_LMCORE), set(LEFT_OUT), NOT_THE_RECIPE]
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # no setting in two groups
    assert set(trial(dataset)) == set().union(*groups)


@pytest.mark.parametrize("dataset", TRIALS)
def test_lambs_values_are_lmcores_behaviour_or_the_documented_omissions(dataset):
    lamb = trial(dataset)
    for known in (AS_LMCORE, LEFT_OUT):
        assert {key: lamb[key] for key in known} == known


@pytest.mark.parametrize("dataset", TRIALS)
def test_the_paper_config_says_what_lamb_says(dataset):
    lamb, flat = trial(dataset), paper(dataset).flat()
    for key, (setting, meaning) in MEANS.items():
        expected = meaning(lamb[key], lamb, dataset)
        if isinstance(expected, float):
            expected = pytest.approx(expected, rel=1e-12)
        assert flat[setting] == expected, f"{setting} (lamb's {key} {lamb[key]!r})"
    for setting, expected in FIXED.items():
        assert flat[setting] == expected, setting


@pytest.mark.parametrize("dataset", TRIALS)
def test_the_paper_model_is_within_its_budget(dataset):
    config = paper(dataset)
    solved = solve_budget(config.model, VOCAB[dataset])
    count = count_parameters(solved, VOCAB[dataset])
    assert 0.99 * config.model.params_budget < count <= config.model.params_budget
    assert count_parameters(solved.model_copy(update={"hidden": solved.hidden + 1}), VOCAB[dataset]) > \
        config.model.params_budget


def test_the_docs_table_has_a_row_for_every_omission():
    rows = [line for line in (ROOT / "docs" / "paper_tools.md").read_text().splitlines() if line.startswith("| `")]
    named = {name for line in rows for name in re.findall(r"`(\w+)`", line.split("|")[1])}  # the lamb column
    assert set(LEFT_OUT) <= named
    assert {"shared_mask_dropout", "downprojected_output_dropout", "max_grad_norm", "max_time_steps", "num_params",
            "trigger_averaging_turns", "eval_softmax_temperature", "forget_bias",
            "min_non_episodic_eval_examples_per_stripe", "dyneval_decay_rate"} <= named
