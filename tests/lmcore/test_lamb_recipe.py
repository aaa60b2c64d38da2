"""The settings that reproduce deepmind/lamb's recipe (issue 22), each against a small expectation worked out by
hand from what lamb's code does: the dropout mask kind, the mixture's latent dropout, the forget bias, the width
rule within a budget, the averaging trigger, the pass offset of fixed windows, the clip's unit, the logit scale
and its search, and dynamic evaluation's decay normalisation."""
import math
from pathlib import Path

import pytest
import torch
import yaml

import lmcore
from lmcore import evaluation
from lmcore.averaging import Averager
from lmcore.batching import pass_start
from lmcore.config import flatten, make_config
from lmcore.dynamic import DynamicEval
from lmcore.evaluation import evaluate
from lmcore.models import build_model, count_parameters, solve_budget
from lmcore.models.dropout import sequence_dropout
from lmcore.train import clip_gradients, train_epoch

WT2_VOCAB = 33278  # WikiText-2's vocabulary, <eos> included
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_sequence_masks_repeat_over_time_and_step_masks_do_not():
    torch.manual_seed(0)
    x = torch.ones(50, 4, 100)
    shared = sequence_dropout(x, 0.5, True, "sequence")
    fresh = sequence_dropout(x, 0.5, True, "step")
    for y in (shared, fresh):  # inverted dropout: every unit is 0 or 1 / (1 - p) = 2
        assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(shared, shared[:1].expand_as(shared))
    assert (fresh != fresh[:1]).any(dim=(1, 2))[1:].all()  # every later step has its own mask
    assert 0.45 < (fresh == 0).float().mean() < 0.55
    for mask in ("sequence", "step"):
        assert torch.equal(sequence_dropout(x, 0.5, False, mask), x)
        assert torch.equal(sequence_dropout(x, 0.0, True, mask), x)


@pytest.mark.parametrize("family", ["mogrifier", "lstm"])
@pytest.mark.parametrize("mask", ["sequence", "step"])
def test_the_models_input_and_inter_masks_follow_the_setting(family, mask):
    """The same token at every step embeds to the same vector, so after input dropout the steps are equal
    exactly when the mask is shared over the sequence; the same holds for the second layer's input."""
    config = make_config({}, {"model.family": family, "model.hidden": 16, "model.layers": 2, "model.rounds": 2,
                              "model.dropout.input": 0.5, "model.dropout.inter": 0.5, "model.dropout.mask": mask})
    torch.manual_seed(0)
    model = build_model(config, vocab_size=20).train()
    seen = []
    model.body.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model(torch.full((12, 3), 7))
    dropped = seen[0]
    assert torch.equal(dropped, dropped[:1].expand_as(dropped)) == (mask == "sequence")
    inter = model.body.layers[1]
    inputs = []
    inter.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    model(torch.full((12, 3), 7))
    second = inputs[0] * 2  # kept units are scaled by 1 / (1 - 0.5); a dropped unit is 0 at that step
    zero = second == 0
    assert torch.equal(zero, zero[:1].expand_as(zero)) == (mask == "sequence")


def test_each_mixture_component_latent_is_dropped_with_the_latent_rate():
    """lamb applies downprojected_output_dropout to each component's latent before the (tied) decoder: what
    the decoder sees is tanh(latent) scaled by 1 / (1 - p) or 0."""
    config = make_config({}, {"model.family": "lstm", "model.hidden": 16, "model.embedding": 8, "model.layers": 1,
                              "model.softmax_mixtures": 2, "model.dropout.latent": 0.25})
    torch.manual_seed(0)
    model = build_model(config, vocab_size=20).train()
    body_out, decoder_in = [], []
    model.body.register_forward_hook(lambda _m, _a, out: body_out.append(out[0]))
    model.decoder.register_forward_pre_hook(lambda _m, args: decoder_in.append(args[0]))
    tokens = torch.randint(0, 20, (6, 3))
    model(tokens)
    clean = torch.tanh(model.mixture.latent(body_out[0])).unflatten(-1, (2, 8))
    seen = decoder_in[0]
    kept = seen != 0
    assert torch.allclose(seen[kept], clean[kept] / 0.75)
    assert 0 < (~kept).sum() < kept.sum()
    model.eval()
    assert torch.equal(model(tokens)[0], model(tokens)[0])  # no latent dropout at evaluation


def test_latent_dropout_acts_on_the_tying_projection_without_a_mixture():
    config = make_config({}, {"model.family": "lstm", "model.hidden": 16, "model.embedding": 8, "model.layers": 1,
                              "model.dropout.latent": 0.5})
    torch.manual_seed(0)
    model = build_model(config, vocab_size=20).train()
    seen = []
    model.decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model(torch.randint(0, 20, (6, 3)))
    assert (seen[0] == 0).any()


@pytest.mark.parametrize("family", ["mogrifier", "lstm"])
def test_forget_bias_adds_to_the_forget_gate_only(family):
    """Gate order i, f, g, o: the second quarter of the bias moves by forget_bias, nothing else changes."""
    def biases(forget_bias):
        torch.manual_seed(0)
        config = make_config({}, {"model.family": family, "model.hidden": 5, "model.layers": 2, "model.rounds": 2,
                                  "model.forget_bias": forget_bias})
        model = build_model(config, vocab_size=20)
        return [layer.bias if family == "mogrifier" else layer.bias_ih_l0 for layer in model.body.layers]

    for plain, shifted in zip(biases(0.0), biases(1.0)):
        expected = torch.tensor([0.0] * 5 + [1.0] * 5 + [0.0] * 10)
        assert torch.allclose(shifted - plain, expected)


def test_forget_bias_needs_a_forget_gate():
    with pytest.raises(ValueError, match="model.forget_bias needs a forget gate"):
        make_config({}, {"model.family": "gru", "model.forget_bias": 1.0})


def test_within_rule_never_exceeds_the_budget_and_ties_the_embedding_to_the_width():
    """lamb on the WikiText-2 paper model: the widest hidden size within 35M, embedding round(0.1993 * H):
    H 1366, E 272, 34,991,552 parameters; one unit wider is over. The nearest rule with a fixed embedding of
    275 (the old paper config) goes over the budget."""
    base = {"model.family": "mogrifier", "model.layers": 2, "model.rounds": 6, "model.rank": 48,
            "model.softmax_mixtures": 2, "model.params_budget": 35_000_000}
    lamb = make_config({}, base | {"model.embedding_ratio": 0.1993194960596213, "model.budget_rule": "within"})
    solved = solve_budget(lamb.model, WT2_VOCAB)
    assert solved.hidden == 1366
    assert build_model(lamb, WT2_VOCAB).embedding.embedding_dim == 272
    assert count_parameters(solved, WT2_VOCAB) == 34_991_552
    wider = solved.model_copy(update={"hidden": 1367})
    assert count_parameters(wider, WT2_VOCAB) > 35_000_000
    old = solve_budget(make_config({}, base | {"model.embedding": 275}).model, WT2_VOCAB)
    assert count_parameters(old, WT2_VOCAB) > 35_000_000


def test_within_rule_on_an_exact_budget_takes_that_width():
    config = make_config({}, {"model.family": "lstm", "model.layers": 1, "model.embedding": 4})
    exact = count_parameters(config.model.model_copy(update={"hidden": 30}), 50)
    for budget, hidden in ((exact, 30), (exact - 1, 29), (exact + 1, 30)):
        rule = config.model.model_copy(update={"params_budget": budget, "budget_rule": "within"})
        assert solve_budget(rule, 50).hidden == hidden


def test_embedding_ratio_is_refused_with_an_embedding_size():
    with pytest.raises(ValueError, match="model.embedding_ratio"):
        make_config({}, {"model.embedding": 200, "model.embedding_ratio": 0.2})


def averager(**optim):
    config = make_config({}, {"optim.average": "asgd"} | {f"optim.{k}": v for k, v in optim.items()})
    return Averager(config.optim, torch.nn.Linear(2, 2))


def first_averaged_epoch(avg: Averager, losses: list[float]) -> int | None:
    for epoch, loss in enumerate(losses, start=1):
        avg.end_epoch(loss)
        if avg.average is not None:
            return epoch
    return None


def test_stale_trigger_starts_when_the_best_is_nonmono_epochs_old():
    """Best at epoch 2 (loss 3); lamb triggers when turn - best_turn >= 3: at epoch 5. AWD-LSTM's rule
    (worse than the best of all but the last 3) triggers later, at epoch 6 (4.2 > min(5, 3)). A new best
    (epoch 5) restarts lamb's count: epoch 8."""
    losses = [5.0, 3.0, 3.1, 3.2, 3.3, 4.2]
    assert first_averaged_epoch(averager(asgd_nonmono=3, asgd_trigger="stale"), losses) == 5
    assert first_averaged_epoch(averager(asgd_nonmono=3), losses) == 6
    improving = [5.0, 3.0, 3.1, 3.2, 2.9, 3.0, 3.0, 3.0]
    assert first_averaged_epoch(averager(asgd_nonmono=3, asgd_trigger="stale"), improving) == 8
    assert first_averaged_epoch(averager(asgd_nonmono=3, asgd_trigger="stale"), [3.0] * 5) == 4  # a tie is no new best


def test_averaging_starts_at_the_latest_epoch_even_while_improving():
    steadily = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert first_averaged_epoch(averager(asgd_nonmono=50, asgd_trigger="stale", asgd_latest=4), steadily) == 4
    assert first_averaged_epoch(averager(asgd_nonmono=50, asgd_trigger="stale"), steadily) is None


def test_pass_start_is_zero_or_a_uniform_row_below_bptt():
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    assert pass_start(7, False, generator) == 0
    assert torch.equal(generator.get_state(), before)  # the default draws nothing: old runs replay exactly
    starts = [pass_start(7, True, generator) for _ in range(400)]
    assert set(starts) == set(range(7))


def test_random_offset_needs_fixed_windows():
    with pytest.raises(ValueError, match="data.random_offset needs data.variable_bptt false"):
        make_config({}, {"data.random_offset": True})
    assert make_config({}, {"data.random_offset": True, "data.variable_bptt": False}).data.random_offset


def test_window_clip_bounds_the_gradient_of_the_summed_loss():
    """lamb clips the gradient of the loss summed over the window's T steps, T times ours: a bound of 10 on it
    is a bound of 10 / T on ours. Gradient (3, 4), norm 5: T = 4 clips it to norm 2.5, (1.5, 2); the token unit
    leaves it under its bound of 10."""
    for unit, expected in (("window", [1.5, 2.0]), ("token", [3.0, 4.0])):
        layer = torch.nn.Linear(2, 1, bias=False)
        layer.weight.grad = torch.tensor([[3.0, 4.0]])
        clip_gradients(layer, make_config({}, {"optim.clip": 10.0, "optim.clip_unit": unit}).optim, 4)
        assert torch.allclose(layer.weight.grad, torch.tensor([expected]))


def first_window_end(random_offset: bool, seed: int) -> int:
    config = make_config({}, {"model.family": "lstm", "model.hidden": 8, "model.layers": 1, "data.bptt": 5,
                              "data.variable_bptt": False, "data.random_offset": random_offset,
                              "train.steps_per_epoch": 1, "train.progress": False})
    model = build_model(config, vocab_size=10)
    loop = {"position": 0, "lr": 1e-3}
    train_data = torch.randint(0, 10, (100, 2))
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=1e-3), train_data, config, loop,
                torch.Generator().manual_seed(seed), torch.device("cpu"), 1)
    return loop["position"]


def test_a_pass_of_fixed_windows_starts_at_a_random_row_below_bptt():
    """One 5-token window from the start of a pass ends at row 5 without an offset, at 5 + offset with one."""
    assert {first_window_end(False, seed) for seed in range(5)} == {5}
    ends = {first_window_end(True, seed) for seed in range(30)}
    assert ends <= set(range(5, 10)) and len(ends) > 2


def test_the_lamb_variant_of_the_2m65_mogrifier_changes_only_lambs_three_pieces():
    """configs/ptb_2m65_mogrifier_lamb.yaml (docs/results.md) is the section-1 Mogrifier plus lamb's dropout kind,
    clip unit and fixed windows with a random offset, and nothing else."""
    def flat(name):
        return make_config({}, flatten(yaml.safe_load((CONFIGS / name).read_text()))).flat()

    base, lamb = flat("ptb_2m65_mogrifier.yaml"), flat("ptb_2m65_mogrifier_lamb.yaml")
    assert {k: v for k, v in lamb.items() if base[k] != v} == {
        "model.dropout.mask": "step", "optim.clip_unit": "window", "data.variable_bptt": False,
        "data.random_offset": True}


def test_lambs_dyneval_normalises_the_decay_by_the_mean_over_all_weights():
    """RMS (1, 1, 1) and (4): the mean of the tensors' means is (1 + 4) / 2 = 2.5, the mean over the four
    weights (1 + 1 + 1 + 4) / 4 = 1.75; decay 0.02 scales to 0.02 * 4 / 2.5 = 0.032 or 0.02 * 4 / 1.75."""
    rms = {"a": torch.ones(3), "b": torch.tensor([4.0])}
    trained = {name: torch.zeros_like(r) for name, r in rms.items()}
    for mean, expected in (("tensors", 0.032), ("elements", 0.02 * 4 / 1.75)):
        settings = make_config({}, {"eval.dynamic_decay": 0.02, "eval.dynamic_decay_mean": mean}).eval
        decay, _ = DynamicEval(settings, rms).rates(trained)
        assert decay["b"].item() == pytest.approx(expected)


@pytest.mark.parametrize("mixtures", [1, 2])
def test_the_logit_scale_multiplies_each_components_logits(mixtures):
    """Scale 0.5 halves a single softmax's logits; near 0 every component is uniform, so the mixture scores
    every word log(1 / vocab) (a scale applied after mixing would not renormalise)."""
    config = make_config({}, {"model.family": "lstm", "model.hidden": 8, "model.layers": 1,
                              "model.softmax_mixtures": mixtures})
    torch.manual_seed(0)
    model = build_model(config, vocab_size=20).eval()
    tokens = torch.randint(0, 20, (5, 2))
    plain = model(tokens)[0]
    model.logit_scale = 1e-9
    flat = model(tokens)[0].log_softmax(-1)
    assert torch.allclose(flat, torch.full_like(flat, -math.log(20)), atol=1e-6)
    if mixtures == 1:
        model.logit_scale = 0.5
        assert torch.allclose(model(tokens)[0], plain * 0.5)


def test_evaluate_scores_with_the_scale_and_restores_it():
    config = make_config({}, {"model.family": "lstm", "model.hidden": 8, "model.layers": 1})
    model = build_model(config, vocab_size=20)
    tokens = torch.randint(0, 20, (60,))
    near_zero = evaluate(model, tokens, eos_id=0, batch_size=2, bptt=5, logit_scale=1e-9)
    assert near_zero["loss"] == pytest.approx(math.log(20), abs=1e-6)
    assert model.logit_scale == 1.0


def test_the_logit_scale_search_walks_down_from_1_06_as_lamb_does(monkeypatch):
    """Losses (s - 0.975)^2: 1.06, 1.04, ..., best 0.98 (the fifth), and lamb stops once the best is two scales
    old, after 0.94. With the search's floor at 1.0 it stops there and takes 1.0. Without a search: the setting."""
    tried = []

    def fake_evaluate(model, tokens, *, logit_scale, **_):
        tried.append(round(logit_scale, 4))
        return {"loss": (logit_scale - 0.975) ** 2}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    model, valid = torch.nn.Linear(1, 1), torch.arange(100)
    walks = ((0.8, 0.98, [1.06, 1.04, 1.02, 1.0, 0.98, 0.96, 0.94]), (1.0, 1.0, [1.06, 1.04, 1.02, 1.0]))
    for floor, best, scales in walks:
        tried.clear()
        config = make_config({}, {"eval.logit_scale_search": floor})
        assert evaluation.choose_logit_scale(model, valid, config, eos_id=0) == pytest.approx(best)
        assert tried == scales
    assert evaluation.choose_logit_scale(model, valid, make_config({}, {"eval.logit_scale": 0.9}), eos_id=0) == 0.9


def test_a_run_with_lambs_pieces_resumes_identically(markov_corpus_dir, tmp_path):
    """Per-step masks, the window clip, fixed windows whose pass offsets are drawn (each 7-step epoch crosses a
    pass of the ~80 rows), lamb's averaging trigger and the logit-scale search all draw on saved state."""
    config = make_config({}, {
        "data.name": "text", "data.dir": str(markov_corpus_dir), "data.batch_size": 64, "data.bptt": 12,
        "data.eval_batch_size": 4, "data.variable_bptt": False, "data.random_offset": True, "model.family": "lstm",
        "model.hidden": 16, "model.layers": 2, "model.forget_bias": 1.0, "model.dropout.input": 0.3,
        "model.dropout.inter": 0.3, "model.dropout.output": 0.3, "model.dropout.mask": "step",
        "optim.clip": 1.0, "optim.clip_unit": "window", "optim.average": "asgd", "optim.asgd_trigger": "stale",
        "optim.asgd_nonmono": 1, "optim.asgd_latest": 2, "eval.logit_scale_search": 0.9,
        "train.epochs": 3, "train.steps_per_epoch": 7, "train.progress": False, "train.device": "cpu"})
    whole, resumed = [], []
    lmcore.train(config, report=lambda m, save: whole.append(m))
    lmcore.train(config.updated({"train.epochs": 1}),
                 report=lambda m, save: save(tmp_path / "epoch1.pt"))
    torch.manual_seed(12345)
    lmcore.train(config, report=lambda m, save: resumed.append(m), resume_from=tmp_path / "epoch1.pt")
    assert [(m["train_loss"], m["valid_ppl"]) for m in whole[1:]] == [(m["train_loss"], m["valid_ppl"]) for m in resumed]
