"""lmcore.batching: batchify, BPTT windows, and evaluation batches that score each token once."""
from __future__ import annotations

import pytest
import torch

from lmcore.batching import IGNORE_INDEX, batchify, bptt_windows, eval_batches


def test_batchify_contiguous_columns():
    batched = batchify(torch.arange(23), 4)
    assert batched.shape == (5, 4) and batched.is_contiguous()
    assert batched[:, 1].tolist() == [5, 6, 7, 8, 9]  # column b is the b-th stretch; the tail 20..22 is dropped
    with pytest.raises(ValueError):
        batchify(torch.arange(3), 4)


def windows(source, **kwargs):
    return list(bptt_windows(source, **kwargs))


@pytest.mark.parametrize("variable", [False, True])
def test_bptt_windows_cover_every_position_once(variable):
    source = batchify(torch.arange(2003), 3)  # 667 rows
    generator = torch.Generator().manual_seed(0)
    starts, covered = [], []
    for start, inputs, targets in windows(source, bptt=35, variable=variable, generator=generator):
        assert len(inputs) == len(targets) <= 35 + 20
        assert torch.equal(targets, inputs + 1)  # targets are the next tokens of each column
        starts.append(start)
        covered.extend(range(start, start + len(inputs)))
    assert covered == list(range(len(source) - 1))
    lengths = {b - a for a, b in zip(starts, starts[1:])}
    if variable:
        assert len(lengths) > 5 and min(lengths) >= 5
    else:
        assert lengths == {35}


def test_bptt_windows_reproducible_and_resumable():
    source = batchify(torch.arange(5000), 2)

    def run(seed):
        return [(s, x.tolist()) for s, x, _ in windows(source, bptt=20, variable=True,
                                                         generator=torch.Generator().manual_seed(seed))]

    assert run(1) == run(1) != run(2)

    # Stop after 10 windows, remember where and the generator state, resume later.
    generator = torch.Generator().manual_seed(1)
    it = bptt_windows(source, 20, True, generator)
    for _ in range(10):
        start, inputs, _ = next(it)
    resume_at, state = start + len(inputs), generator.get_state()
    resumed = torch.Generator().set_state(state)
    rest = [(s, x.tolist()) for s, x, _ in bptt_windows(source, 20, True, resumed, start=resume_at)]
    assert rest == run(1)[10:]


def test_bptt_windows_never_run_past_the_data():
    source = batchify(torch.arange(30), 1)
    last_start, inputs, targets = windows(source, bptt=7, variable=True, generator=torch.Generator())[-1]
    assert last_start + len(inputs) == len(source) - 1 and targets[-1].item() == 29


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_eval_batches_score_each_token_once(batch_size):
    eos_id = 99
    tokens = torch.randint(0, 50, (103,), generator=torch.Generator().manual_seed(0))
    columns_in, columns_tgt = [], []
    for inputs, targets in eval_batches(tokens, batch_size, bptt=10, eos_id=eos_id):
        assert inputs.shape == targets.shape and inputs.shape[1] == batch_size and len(inputs) <= 10
        columns_in.append(inputs)
        columns_tgt.append(targets)
    inputs, targets = torch.cat(columns_in), torch.cat(columns_tgt)  # [ceil(N / B), B]
    # Read column by column: the split's tokens, each once, then only ignored padding.
    flat_targets, flat_inputs = targets.t().reshape(-1), inputs.t().reshape(-1)
    scored = flat_targets[flat_targets != IGNORE_INDEX]
    assert torch.equal(scored, tokens)
    assert (flat_targets[len(tokens):] == IGNORE_INDEX).all()
    assert flat_targets[0] == tokens[0] and flat_inputs[0] == eos_id  # the first token is predicted from <eos>
    assert torch.equal(flat_inputs[1 : len(tokens)], tokens[:-1])
