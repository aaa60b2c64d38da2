"""Weight averaging (optim.average): EMA, AWD-LSTM's triggered ASGD average, and what sees the average."""
import pytest
import torch

import lmcore
from lmcore.averaging import Averager
from lmcore.config import make_config
from lmcore.evaluation import evaluate


def setup(average, **optim):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    config = make_config({}, {"optim.average": average} | {f"optim.{k}": v for k, v in optim.items()}).optim
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averager = Averager(config, model)
    averager.hook(optimizer)
    return model, optimizer, averager


def step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()
    return model.weight.detach().clone()


def test_ema_follows_its_formula():
    model, optimizer, averager = setup("ema", ema_decay=0.8)
    expected = model.weight.detach().clone()
    for t in range(1, 41):  # the warm-up reaches the decay at t = 36
        decay = min(0.8, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * step(model, optimizer)
    with averager.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected)


def test_a_short_runs_ema_forgets_the_initial_weights():
    """Without the warm-up, 100 steps at decay 0.999 would keep 90% of the initial weights in the average."""
    model, _, averager = setup("ema", ema_decay=0.999)
    initial = model.weight.detach().clone()
    for _ in range(100):
        with torch.no_grad():
            model.weight.zero_()  # every iterate is 0: what is left of the average is the initial weights' share
        averager.update()
    with averager.applied(model):
        assert model.weight.abs().max() < 0.01 * initial.abs().max()


def test_asgd_starts_when_validation_stops_improving_then_averages_uniformly():
    model, optimizer, averager = setup("asgd", asgd_nonmono=2)
    for loss in [5.0, 4.0, 3.0, 3.5]:  # 3.5 is worse than 5.0, but 5.0 is not yet older than 2 epochs
        step(model, optimizer)
        averager.end_epoch(loss)
    assert averager.average is None
    start = model.weight.detach().clone()
    averager.end_epoch(4.5)  # worse than min(5, 4, 3) of all but the last 2 epochs: trigger
    iterates = [start] + [step(model, optimizer) for _ in range(4)]
    raw = model.weight.detach().clone()
    with averager.applied(model):
        torch.testing.assert_close(model.weight.detach(), torch.stack(iterates).mean(0))
    assert torch.equal(model.weight.detach(), raw)  # the training weights are back, bitwise


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("average", ["ema", "asgd"])
def test_average_state_round_trips(average):
    """Saved as a checkpoint saves it and loaded as resume loads it, the averager continues exactly."""
    model, optimizer, averager = setup(average, ema_decay=0.5, asgd_nonmono=1)
    for loss in [4.0, 5.0, 4.5]:  # asgd: 4.5 is worse than 4.0, the best but the last epoch: the average starts
        step(model, optimizer)
        averager.end_epoch(loss)
    step(model, optimizer)
    assert averager.average is not None and averager.count == (2 if average == "asgd" else 5)
    with averager.applied(model) as state:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
    other, other_optimizer, restored = setup(average, ema_decay=0.5, asgd_nonmono=1)
    other.load_state_dict(saved)
    restored.load(state)
    assert same_weights(other, model)  # training weights
    for net, opt, averaged in ((model, optimizer, averager), (other, other_optimizer, restored)):
        torch.manual_seed(1)
        step(net, opt)
        averaged.end_epoch(3.0)
    assert (restored.count, restored.history) == (averager.count, averager.history)
    with averager.applied(model), restored.applied(other):
        assert same_weights(other, model)  # averages
    with pytest.raises(ValueError, match=f"optim.average='{average}'"):
        setup("ema" if average == "asgd" else "asgd")[2].load(state)


def test_validation_and_checkpoint_use_the_averaged_weights(markov_corpus_dir, tmp_path):
    config = make_config({}, {"data.name": "text", "data.dir": str(markov_corpus_dir), "data.batch_size": 8,
                              "data.bptt": 12, "data.eval_batch_size": 4, "model.family": "lstm",
                              "model.hidden": 32, "model.layers": 1, "optim.lr": 1e-2, "train.epochs": 1,
                              "train.steps_per_epoch": 20, "train.progress": False, "train.device": "cpu",
                              "optim.average": "ema", "optim.ema_decay": 0.9})
    reports = []
    lmcore.train(config, report=lambda m, save: (reports.append(m), save(tmp_path / "c.pt")))
    model, vocab, _ = lmcore.load_checkpoint(tmp_path / "c.pt")
    corpus = lmcore.load_corpus("text", markov_corpus_dir)
    scoring = dict(eos_id=vocab.eos_id, batch_size=4, bptt=12)
    assert evaluate(model, corpus.valid, **scoring)["ppl"] == pytest.approx(reports[0]["valid_ppl"], rel=1e-6)
    payload = torch.load(tmp_path / "c.pt", weights_only=False)
    model.load_state_dict(payload["averaging"]["weights"], strict=False)  # tied weights are listed once
    # the training weights score differently
    assert evaluate(model, corpus.valid, **scoring)["ppl"] != pytest.approx(reports[0]["valid_ppl"], rel=1e-4)
