"""The Transformer's memory (Transformer-XL segment-level recurrence) and rotary positions."""
import pytest
import torch
from pydantic import ValidationError

import lmcore
from lmcore.config import make_config
from lmcore.evaluation import evaluate
from lmcore.models import build_model


def transformer(memory, layers=2, pos_encode="rope", **overrides):
    config = make_config({}, {"model.family": "transformer", "model.d_model": 24, "model.heads": 2,
                              "model.layers": layers, "model.memory": memory, "model.pos_encode": pos_encode,
                              "model.dropout.inter": 0.1} | overrides)
    torch.manual_seed(0)
    return build_model(config, vocab_size=30).eval()


def by_windows(model, tokens, lengths):
    outputs, state, start = [], None, 0
    for length in lengths:
        logits, state = model(tokens[start:start + length], state)
        outputs.append(logits)
        start += length
    return torch.cat(outputs), state


@pytest.mark.parametrize("pos_encode", ["rope", "none"])
def test_windows_with_a_long_memory_equal_one_pass_over_the_whole_context(pos_encode):
    model = transformer(memory=64, pos_encode=pos_encode)
    tokens = torch.randint(0, 30, (15, 3))
    whole, _ = model(tokens)
    windowed, state = by_windows(model, tokens, [5, 3, 7])
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)
    assert len(state) == 2 and all(s.shape == (15, 3, 24) for s in state)


def test_memory_is_capped_at_m_tokens():
    """One block sees exactly the last M tokens before its window: the same as one pass over the explicit
    concatenated context tokens[start - M:end] (rotary positions are relative, so the offset does not matter)."""
    memory, length = 4, 5
    model = transformer(memory=memory, layers=1)
    tokens = torch.randint(0, 30, (20, 2))
    windowed, state = by_windows(model, tokens, [length] * 4)
    for start in range(length, 20, length):
        context = tokens[start - memory:start + length]
        explicit, _ = model(context)
        torch.testing.assert_close(windowed[start:start + length], explicit[memory:], atol=1e-5, rtol=1e-5)
    assert state[0].shape == (memory, 2, 24)
    without_cap, _ = by_windows(transformer(memory=64, layers=1), tokens, [length] * 4)
    assert not torch.allclose(windowed[10:], without_cap[10:], atol=1e-4)  # the cap changed something


def test_causal_with_memory():
    model = transformer(memory=8)
    tokens = torch.randint(0, 30, (12, 2))
    changed = tokens.clone()
    changed[9:] = (changed[9:] + 1) % 30
    a, _ = by_windows(model, tokens, [6, 6])
    b, _ = by_windows(model, changed, [6, 6])
    torch.testing.assert_close(a[:9], b[:9], atol=1e-6, rtol=1e-6)  # the past never sees the future
    assert not torch.allclose(a[9:], b[9:], atol=1e-5)


def test_no_gradient_flows_into_the_memory():
    model = transformer(memory=8).train()
    tokens = torch.randint(0, 30, (12, 2))
    _, state = model(tokens[:6])
    assert all(not s.requires_grad for s in state)
    leaked = [s.clone().requires_grad_() for s in state]  # even a memory that carries a graph is cut
    logits, new_state = model(tokens[6:], leaked)
    logits.sum().backward()
    assert all(s.grad is None for s in leaked)
    assert all(not s.requires_grad for s in new_state)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_evaluate_carries_the_memory_across_windows(batch_size):
    """With a memory longer than a column, scoring window by window equals scoring each column at once."""
    model = transformer(memory=64)
    tokens = torch.randint(0, 30, (61,))
    windowed = evaluate(model, tokens, eos_id=0, batch_size=batch_size, bptt=4)
    at_once = evaluate(model, tokens, eos_id=0, batch_size=batch_size, bptt=64)
    short = evaluate(transformer(memory=0), tokens, eos_id=0, batch_size=batch_size, bptt=4)
    assert windowed["tokens"] == at_once["tokens"] == 61
    assert windowed["loss"] == pytest.approx(at_once["loss"], rel=1e-5)
    assert windowed["loss"] != pytest.approx(short["loss"], rel=1e-5)


def test_absolute_positions_with_a_memory_are_rejected():
    with pytest.raises(ValidationError, match="model.memory .* needs model.pos_encode rope or none"):
        make_config({}, {"model.family": "transformer", "model.memory": 32, "model.pos_encode": "sinusoidal"})
    make_config({}, {"model.family": "lstm", "model.memory": 32})  # ignored by the RNN families


def test_memory_changes_no_parameter_count():
    counts = {m: transformer(memory=m, pos_encode="rope").num_parameters() for m in (0, 16)}
    assert counts[0] == counts[16] == transformer(memory=0, pos_encode="none").num_parameters()


def test_transformer_with_memory_trains_and_resumes(markov_corpus_dir, tmp_path):
    config = make_config({}, {"data.name": "text", "data.dir": str(markov_corpus_dir), "data.batch_size": 8,
                              "data.bptt": 12, "data.eval_batch_size": 4, "model.family": "transformer",
                              "model.d_model": 32, "model.heads": 2, "model.layers": 1, "model.memory": 24,
                              "model.pos_encode": "rope", "optim.lr": 1e-2, "train.epochs": 2,
                              "train.steps_per_epoch": 8, "train.progress": False, "train.device": "cpu"})
    whole = []
    lmcore.train(config, report=lambda m, save: (whole.append(m), save(tmp_path / f"e{m['epoch']}.pt")))
    resumed = []
    lmcore.train(config, report=lambda m, save: resumed.append(m), resume_from=tmp_path / "e1.pt")
    assert whole[0]["valid_ppl"] > whole[1]["valid_ppl"]
    assert resumed[0]["valid_ppl"] == whole[1]["valid_ppl"]


def test_the_memory_mask_gives_the_boolean_lower_right_causal_attention():
    """The memory's mask (a bias object the fused CUDA kernels accept) attends as the explicit boolean mask
    [T, M + T] does: every memory slot, the window up to the query; forward and backward, with dropout."""
    from lmcore.models.transformer import Attention, attention_mask

    length, memory = 5, 4
    attention = Attention(d_model=24, heads=2, dropout=0.3, rope=True).train()
    allowed = torch.ones(length, memory + length, dtype=torch.bool).tril(memory)
    assert allowed[0].tolist() == [True] * (memory + 1) + [False] * (length - 1)
    x = torch.randn(length, 3, 24)
    context = torch.cat([torch.randn(memory, 3, 24), x]).requires_grad_()
    runs = []
    for mask in (attention_mask(length, memory), allowed):
        torch.manual_seed(1)  # the same dropout
        out = attention(x, context, mask)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (context, attention.in_proj.weight))))
    for bias, boolean in zip(*runs):
        torch.testing.assert_close(bias, boolean, rtol=0, atol=0)
    assert attention_mask(length, 0) is None  # no memory: plain causal attention


def test_cuda_attention_over_a_memory_runs_on_the_flash_kernel():
    """With a memory the mask is not square; a boolean mask would rule out flash attention on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = transformer(memory=8, **{"model.d_model": 64, "model.heads": 4}).cuda().train()
    tokens = torch.randint(0, 30, (12, 2), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, state = model(tokens[:6])
        logits, _ = model(tokens[6:], state)
        logits.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
