"""Mixture of softmaxes (Yang et al., 2018): model.softmax_mixtures."""
import pytest
import torch

from lmcore.config import make_config
from lmcore.models import build_model, count_parameters

FAMILIES = ["mogrifier", "lstm", "gru", "rnn", "transformer"]


def small(family, mixtures, **overrides):
    return make_config({}, {"model.family": family, "model.hidden": 24, "model.d_model": 24, "model.heads": 2,
                            "model.layers": 1, "model.rounds": 2, "model.embedding": 16,
                            "model.softmax_mixtures": mixtures} | overrides)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_component_is_exactly_the_plain_decoder(family):
    torch.manual_seed(0)
    model = build_model(small(family, 1), vocab_size=30).eval()
    assert model.mixture is None
    tokens = torch.randint(0, 30, (6, 2))
    hidden, _ = model.body(model.embedding(tokens))
    expected = model.decoder(model.projection(hidden))
    assert torch.equal(model(tokens)[0], expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [True, False])
def test_mixture_outputs_are_normalised_log_probabilities(family, tie):
    torch.manual_seed(0)
    model = build_model(small(family, 3, **{"model.tie_weights": tie}), vocab_size=30)
    assert (model.decoder.weight is model.embedding.weight) == tie
    log_probs, _ = model(torch.randint(0, 30, (6, 2)))
    assert log_probs.shape == (6, 2, 30)
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(6, 2), atol=1e-5, rtol=0)
    log_probs.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mixture_of_identical_components_is_one_softmax():
    """Two components with the same latent weights mix to exactly that component's softmax."""
    torch.manual_seed(0)
    model = build_model(small("lstm", 2), vocab_size=30).eval()
    latent = model.mixture.latent
    with torch.no_grad():
        latent.weight[16:] = latent.weight[:16]
        latent.bias[16:] = latent.bias[:16]
    tokens = torch.randint(0, 30, (6, 2))
    hidden, _ = model.body(model.embedding(tokens))
    one = torch.log_softmax(model.decoder(torch.tanh(hidden @ latent.weight[:16].T + latent.bias[:16])), -1)
    torch.testing.assert_close(model(tokens)[0], one, atol=1e-5, rtol=1e-5)


def test_cross_entropy_of_the_mixture_is_its_negative_log_likelihood():
    torch.manual_seed(0)
    model = build_model(small("gru", 2), vocab_size=30)
    tokens, targets = torch.randint(0, 30, (6, 2)), torch.randint(0, 30, (6, 2))
    log_probs, _ = model(tokens)
    loss = torch.nn.functional.cross_entropy(log_probs.flatten(0, 1), targets.flatten())
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, nll)


@pytest.mark.parametrize("family", ["mogrifier", "transformer"])
def test_the_budget_solver_counts_the_mixture(family):
    one, two = (count_parameters(small(family, k).model, 1000) for k in (1, 2))
    assert two > one
    budget = 400_000
    config = make_config({}, {"model.family": family, "model.params_budget": budget, "model.softmax_mixtures": 2,
                              "model.heads": 4, "model.layers": 1})
    model = build_model(config, 1000)
    assert abs(model.num_parameters() - budget) / budget < 0.01
    plain = build_model(config.updated({"model.softmax_mixtures": 1}), 1000)
    width = "d_model" if family == "transformer" else "hidden"
    assert getattr(model.config, width) < getattr(plain.config, width)  # the mixture's parameters cost width
