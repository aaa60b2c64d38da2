"""The LM shell, the families, the dropouts and the parameter budget (the Mogrifier layer's own
equations are in test_mogrifier.py)."""
import pytest
import torch

from lmcore.config import make_config
from lmcore.models import build_model, count_parameters
from lmcore.models.dropout import embedding_dropout, locked_dropout

FAMILIES = ["mogrifier", "lstm", "gru", "rnn", "transformer"]
ALL_DROPOUTS = {f"model.dropout.{k}": 0.2 for k in ("input", "inter", "state", "output", "embedding")}


def small(family, **overrides):
    base = {"model.family": family, "model.hidden": 24, "model.d_model": 24, "model.heads": 2,
            "model.layers": 2, "model.rounds": 3} | ALL_DROPOUTS
    return make_config({}, base | overrides)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [True, False])
def test_forward_shapes_and_gradient_reaches_every_parameter(family, tie, device):
    torch.manual_seed(0)
    model = build_model(small(family, **{"model.embedding": 16, "model.tie_weights": tie}), vocab_size=50)
    model, tokens = model.to(device), torch.randint(0, 50, (9, 3), device=device)
    logits, state = model(tokens)
    assert logits.shape == (9, 3, 50)
    assert (state is None) == (family == "transformer")
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert (model.projection is not None) == tie  # 24-wide body, 16-wide tied embedding: projected
    assert (model.decoder.weight is model.embedding.weight) == tie


@pytest.mark.parametrize("family", FAMILIES)
def test_state_is_carried_between_calls(family, device):
    """Scoring a sequence in two halves with the carried state equals scoring it at once (eval mode)."""
    torch.manual_seed(0)
    model = build_model(small(family), vocab_size=30).eval().to(device)
    tokens = torch.randint(0, 30, (10, 2), device=device)
    whole, _ = model(tokens)
    first, state = model(tokens[:6])
    second, _ = model(tokens[6:], state)
    if family == "transformer":  # no state: the second half sees only itself
        assert not torch.allclose(torch.cat([first, second]), whole, atol=1e-5)
        assert torch.allclose(first, whole[:6], atol=1e-5)
    else:
        assert torch.allclose(torch.cat([first, second]), whole, atol=1e-5)


@pytest.mark.parametrize("pos_encode", ["none", "sinusoidal", "learned", "rope"])
def test_transformer_is_causal(pos_encode):
    torch.manual_seed(0)
    model = build_model(small("transformer", **{"model.pos_encode": pos_encode}), vocab_size=30).eval()
    tokens = torch.randint(0, 30, (8, 2))
    changed = tokens.clone()
    changed[5:] = (changed[5:] + 1) % 30
    a, _ = model(tokens)
    b, _ = model(changed)
    assert torch.allclose(a[:5], b[:5], atol=1e-5)  # the past does not see the future
    assert not torch.allclose(a[5:], b[5:], atol=1e-5)


def test_positional_encoding_makes_order_matter():
    """Without positions, causal attention over a repeated token is the same at every position."""
    torch.manual_seed(0)
    tokens = torch.full((6, 1), 7)
    for pos_encode, varies in [("none", False), ("sinusoidal", True), ("learned", True)]:
        model = build_model(small("transformer", **{"model.pos_encode": pos_encode}), vocab_size=30).eval()
        if pos_encode == "learned":
            torch.nn.init.normal_(model.body.positions)
        logits, _ = model(tokens)
        assert (not torch.allclose(logits[0], logits[-1], atol=1e-5)) == varies, pos_encode
    # Rotary positions are relative: a constant sequence looks the same everywhere, but order does matter
    # (one block: with two, causal masking alone already tells orders apart).
    for pos_encode, varies in [("none", False), ("rope", True)]:
        config = small("transformer", **{"model.pos_encode": pos_encode, "model.layers": 1})
        model = build_model(config, vocab_size=30).eval()
        last = [model(torch.tensor(order).unsqueeze(1))[0][-1] for order in ([3, 4, 4, 5], [4, 3, 4, 5])]
        assert (not torch.allclose(*last, atol=1e-5)) == varies, pos_encode


def test_dropout_is_off_in_eval_and_variational_in_training():
    torch.manual_seed(0)
    x = torch.ones(7, 4, 32)
    y = locked_dropout(x, 0.5, training=True)
    assert torch.equal(y, y[:1].expand_as(y))  # the same mask at every time step
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)
    emb = torch.nn.Embedding(10, 8)
    out = embedding_dropout(emb, torch.tensor([[3, 3, 3, 4]]), 0.5, training=True)
    for a in out[0, 1:3]:  # every occurrence of a word type shares its fate
        assert torch.equal(a, out[0, 0])
    for family in FAMILIES:
        model = build_model(small(family), vocab_size=30)
        tokens = torch.randint(0, 30, (5, 2))
        model.eval()
        assert torch.equal(model(tokens)[0], model(tokens)[0])
        model.train()
        assert not torch.equal(model(tokens)[0], model(tokens)[0]), family


@pytest.mark.parametrize("family", ["rnn", "mogrifier"])
def test_state_dropout_alone_changes_training_output(family):
    torch.manual_seed(0)
    overrides = {k: 0.0 for k in ALL_DROPOUTS} | {"model.dropout.state": 0.5, "model.layers": 1}
    model = build_model(small(family, **overrides), vocab_size=30).train()
    tokens = torch.randint(0, 30, (6, 2))
    out_a, out_b = model(tokens)[0], model(tokens)[0]
    assert torch.equal(out_a[0], out_b[0])  # the first step sees the zero state: nothing to drop
    assert not torch.equal(out_a[1:], out_b[1:])


@pytest.mark.parametrize("family,budget", [("mogrifier", 24_000_000), ("lstm", 24_000_000),
                                           ("transformer", 24_000_000), ("mogrifier", 35_000_000)])
def test_parameter_budget_is_met_closely(family, budget):
    vocab = 10_000 if budget == 24_000_000 else 33_278
    config = make_config({}, {"model.family": family, "model.params_budget": budget, "model.rank": 84,
                              "model.heads": 8})
    model = build_model(config, vocab)
    assert abs(model.num_parameters() - budget) / budget < 0.01
    assert model.num_parameters() == count_parameters(model.config, vocab)
    field, step = ("d_model", 8) if family == "transformer" else ("hidden", 1)
    width = getattr(model.config, field)
    assert width % step == 0
    for neighbour in (width - step, width + step):  # no other width is closer to the budget
        other = count_parameters(model.config.model_copy(update={field: neighbour}), vocab)
        assert abs(other - budget) >= abs(model.num_parameters() - budget)


def test_low_rank_mogrifier_has_fewer_parameters_by_the_formula():
    full = build_model(small("mogrifier", **{"model.layers": 1, "model.embedding": 16,
                                             "model.tie_weights": False}), 30)
    low = build_model(small("mogrifier", **{"model.layers": 1, "model.embedding": 16, "model.rank": 4,
                                            "model.tie_weights": False}), 30)
    m, n, k, rounds = 16, 24, 4, 3
    # round matrices: full m*n each; low rank k*(m+n) each; biases unchanged
    assert full.num_parameters() - low.num_parameters() == rounds * (m * n - k * (m + n))
