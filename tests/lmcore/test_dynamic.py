"""Dynamic evaluation (Krause et al., 2018): lmcore.dynamic, lmcore.evaluate(dynamic=...), evaluate --dynamic."""
import random

import pytest
import torch

import lmcore
from lmcore.batching import eval_batches
from lmcore.cli import main
from lmcore.config import EvalConfig, make_config
from lmcore.dynamic import DynamicEval, choose, prepare
from lmcore.evaluation import evaluate
from lmcore.final import choose_and_test
from lmcore.models import build_model, detach_state


def tiny_config(corpus_dir, family, **overrides):
    return make_config({}, {"data.name": "text", "data.dir": str(corpus_dir), "data.batch_size": 8,
                            "data.bptt": 12, "data.eval_batch_size": 4, "model.family": family,
                            "model.hidden": 32, "model.d_model": 32, "model.rounds": 2, "model.heads": 2, "model.layers": 1,
                            "model.memory": 16 if family == "transformer" else 0, "model.pos_encode": "rope",
                            "optim.lr": 1e-2, "train.epochs": 1, "train.steps_per_epoch": 60,
                            "train.progress": False, "train.device": "cpu"} | overrides)


@pytest.fixture(scope="module")
def trained(markov_corpus_dir, tmp_path_factory):
    """{family: checkpoint path} of briefly trained tiny models."""
    folder = tmp_path_factory.mktemp("dynamic")
    paths = {}
    for family in ("lstm", "transformer", "mogrifier"):
        paths[family] = folder / f"{family}.pt"
        lmcore.train(tiny_config(markov_corpus_dir, family),
                     report=lambda m, save, p=paths[family]: save(p))
    return paths


@pytest.fixture(scope="module")
def corpus(markov_corpus_dir):
    return lmcore.load_corpus("text", markov_corpus_dir)


def settings(**changes):
    return EvalConfig(dynamic_stat_batch_size=8, dynamic_stat_windows=20, **changes)


@pytest.mark.parametrize("family", ["lstm", "transformer", "mogrifier"])
@pytest.mark.parametrize("method", ["rms", "sgd"])
def test_a_learning_rate_of_zero_is_static_evaluation_exactly(trained, corpus, family, method, monkeypatch):
    model, vocab, _ = lmcore.load_checkpoint(trained[family])
    dynamic = prepare(model, corpus.train, settings(dynamic_method=method, dynamic_lr=0.0, dynamic_bptt=7,
                                                    dynamic_batch_size=3))
    # The same windows, state and sums. One kernel differs: without autograd, torch runs the LSTM on CPU
    # through oneDNN, which rounds differently in the last bits; with oneDNN off, both take the same path.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    static = evaluate(model, corpus.valid, eos_id=vocab.eos_id, batch_size=3, bptt=7)
    adapted = evaluate(model, corpus.valid, eos_id=vocab.eos_id, dynamic=dynamic)
    assert adapted["tokens"] == static["tokens"]
    assert adapted["loss"] == static["loss"]


def repeated_block(corpus, repeats=5, length=60):
    """Random words (not the corpus's Markov chain), the same block `repeats` times."""
    rng = random.Random(0)
    block = [rng.randrange(4, len(corpus.vocab)) for _ in range(length)]
    return torch.tensor(block * repeats)


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_dynamic_evaluation_learns_a_text_that_repeats(trained, corpus, family):
    model, vocab, _ = lmcore.load_checkpoint(trained[family])
    text = repeated_block(corpus)
    static = evaluate(model, text, eos_id=vocab.eos_id, batch_size=1, bptt=5)
    dynamic = prepare(model, corpus.train, settings(dynamic_lr=1e-3, dynamic_decay=1e-3))
    adapted = evaluate(model, text, eos_id=vocab.eos_id, dynamic=dynamic)
    assert adapted["tokens"] == static["tokens"] == 300
    assert adapted["ppl"] < 0.5 * static["ppl"], (adapted, static)


def test_weights_are_restored_bitwise(trained, corpus):
    model, vocab, _ = lmcore.load_checkpoint(trained["lstm"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("rms", "sgd"):
        dynamic = prepare(model, corpus.train, settings(dynamic_method=method, dynamic_lr=1e-2))
        evaluate(model, corpus.valid, eos_id=vocab.eos_id, dynamic=dynamic)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters()) and not model.training


def reference_dynamic_loss(model, tokens, dynamic, eos_id):
    """The update rule of lmcore/dynamic.py's docstring, written out plainly (temporaries, dense gradients)."""
    s = dynamic.settings
    model.eval()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    decay, step = dynamic.rates(trained)
    total, count, state = 0.0, 0, None
    for inputs, targets in eval_batches(tokens, s.dynamic_batch_size, s.dynamic_bptt, eos_id):
        state = detach_state(state)
        logits, state = model(inputs, state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                 reduction="sum")
        scored = int((targets != -100).sum())
        model.zero_grad()
        (loss / scored).backward()
        total, count = total + loss.item(), count + scored
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(p + decay[n] * (trained[n] - p) - step[n] * p.grad)
    return total / count


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["rms", "sgd"])
def test_the_update_is_the_documented_rule(corpus, tied, method):
    """The in-place update (and the sparse embedding gradient used when tied) computes the plain rule."""
    torch.manual_seed(0)
    model = build_model({"model": {"family": "lstm", "hidden": 32, "layers": 1, "tie_weights": tied}},
                        len(corpus.vocab))
    dynamic = prepare(model, corpus.train, settings(dynamic_method=method, dynamic_lr=1e-3 if method == "rms"
                                                    else 0.5, dynamic_decay=2e-2, dynamic_batch_size=2))
    text = corpus.valid[:400]
    adapted = dynamic.evaluate(model, text, eos_id=corpus.vocab.eos_id, device=torch.device("cpu"))
    static = evaluate(model, text, eos_id=corpus.vocab.eos_id, batch_size=2, bptt=5)
    assert not model.embedding.sparse
    assert adapted["loss"] < static["loss"] - 0.01  # the steps are large enough to matter
    # rel: with tied weights the sparse embedding gradient is summed in another order, and the RMS steps
    # amplify those last bits over the windows (about 1e-8 here).
    assert adapted["loss"] == pytest.approx(reference_dynamic_loss(model, text, dynamic, corpus.vocab.eos_id),
                                            rel=1e-5)


def test_rms_statistics_follow_the_training_gradients(trained, corpus):
    model, _, _ = lmcore.load_checkpoint(trained["lstm"])
    dynamic = prepare(model, corpus.train, settings())
    assert set(dynamic.rms) == {name for name, _ in model.named_parameters()}
    assert all((r >= 0).all() and r.shape == p.shape for r, (_, p) in zip(dynamic.rms.values(),
                                                                          model.named_parameters()))
    decay, step = dynamic.rates(dict(model.named_parameters()))
    assert all((d <= 1).all() for d in decay.values())  # clipped at 1 / decay: never overshoots the weights


def test_choose_searches_lr_and_decay_on_valid(trained, corpus):
    model, vocab, _ = lmcore.load_checkpoint(trained["lstm"])
    dynamic = prepare(model, corpus.train, settings(dynamic_lr=1e-4, dynamic_decay=1e-3, dynamic_batch_size=4))
    best, valid = choose(model, corpus.valid, dynamic, eos_id=vocab.eos_id, factors=(1.0, 10.0))
    assert best.settings.dynamic_lr in (1e-4, 1e-3) and best.settings.dynamic_decay in (1e-3, 1e-2)
    again = evaluate(model, corpus.valid, eos_id=vocab.eos_id, dynamic=best)
    assert again == valid
    for lr in (1e-4, 1e-3):
        other = DynamicEval(best.settings.model_copy(update={"dynamic_lr": lr}), dynamic.rms)
        assert evaluate(model, corpus.valid, eos_id=vocab.eos_id, dynamic=other)["loss"] >= valid["loss"]


def test_the_tuners_dynamic_column_chooses_on_valid_and_scores_test_once(trained, corpus, monkeypatch):
    """choose_and_test (report.dynamic): every searched setting scored on valid only; test once, last, with
    the setting that scored best on valid."""
    calls = []
    real = DynamicEval.evaluate

    def recorded(self, model, tokens, **kwargs):
        result = real(self, model, tokens, **kwargs)
        split = next(name for name in ("valid", "test") if torch.equal(tokens, getattr(corpus, name)))
        calls.append((split, self.settings.dynamic_lr, self.settings.dynamic_decay, result))
        return result

    monkeypatch.setattr(DynamicEval, "evaluate", recorded)
    quick = {"eval.dynamic_stat_windows": 10, "eval.dynamic_batch_size": 4, "eval.dynamic_bptt": 10}
    chosen = choose_and_test(trained["lstm"], overrides=quick)
    *searched, (split, lr, decay, test) = calls
    assert split == "test" and all(c[0] == "valid" for c in searched) and len(searched) == 5  # 3 lrs, 2 more decays
    best = min(searched, key=lambda c: c[3]["loss"])
    assert (lr, decay) == best[1:3] == (chosen["dynamic_lr"], chosen["dynamic_decay"])
    assert chosen["dynamic_test_ppl"] == test["ppl"] and chosen["dynamic_valid_ppl"] == best[3]["ppl"]


def test_evaluate_dynamic_on_the_command_line(trained, markov_corpus_dir, tmp_path, capsys, caplog):
    """The documented `python -m lmcore evaluate --run-name X --dynamic [--set eval....]`, on a tiny run."""
    runs = tmp_path / "runs"
    (runs / "tiny").mkdir(parents=True)
    (runs / "tiny" / "best.pt").write_bytes(trained["lstm"].read_bytes())
    before = (runs / "tiny" / "best.pt").read_bytes()
    common = ["evaluate", "--run-name", "tiny", "--runs-dir", str(runs), "--data-dir", str(markov_corpus_dir)]
    quick = [f"eval.dynamic_{k}" for k in ("stat_windows=10", "stat_batch_size=8", "batch_size=4", "bptt=10")]
    assert main([*common, "--dynamic", *(a for q in quick for a in ("--set", q))]) == 0
    out = capsys.readouterr().out
    assert "dynamic evaluation: rms, lr 5e-05, decay 0.002, bptt 10, batch size 4" in out and "test" in out
    assert "tokens, dynamic, batch size 4, a step every 10 tokens) ..." in caplog.text  # not eval_batch_size
    assert main([*common, "--dynamic-search", *(a for q in quick for a in ("--set", q))]) == 0
    assert "dynamic_test_ppl" in capsys.readouterr().out
    assert (runs / "tiny" / "best.pt").read_bytes() == before  # evaluation never changes the checkpoint
    assert main([*common, "--dynamic", "--set", "optim.lr=1"]) == 2
    assert "only eval.* settings" in capsys.readouterr().err
    assert main([*common, "--dynamic", "--set", "eval.dynamic_lr=-1"]) == 2
    assert "eval.dynamic_lr" in capsys.readouterr().err
