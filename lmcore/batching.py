"""Cutting a token stream into batches: columns for training, windows for truncated BPTT, and
evaluation batches that score every token exactly once. Pure tensor functions."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

IGNORE_INDEX = -100  # torch's cross-entropy default ignore_index: such targets are never scored


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N] -> [N // batch_size, batch_size]: column b is the b-th contiguous stretch of the stream.

    The tail that does not fill a row is dropped, as in pytorch/examples (fine for training).
    """
    if tokens.dim() != 1 or batch_size < 1:
        raise ValueError(f"need a 1-D tensor and batch_size >= 1, got shape {tuple(tokens.shape)}, {batch_size}")
    rows = tokens.size(0) // batch_size
    if rows == 0:
        raise ValueError(f"{tokens.size(0)} tokens are fewer than batch_size {batch_size}")
    return tokens[: rows * batch_size].view(batch_size, rows).t().contiguous()


MAX_EXTRA = 20  # a variable window is at most bptt + MAX_EXTRA tokens long


def longest_window(bptt: int, variable: bool) -> int:
    """The longest training window `window_length` can return."""
    return bptt + MAX_EXTRA if variable else bptt


def window_length(bptt: int, variable: bool, generator: torch.Generator | None) -> int:
    """bptt, or with `variable` the AWD-LSTM random length: mostly around bptt, sometimes around
    bptt / 2 (so window boundaries move between epochs), at least 5, at most bptt + 20."""
    if not variable:
        return bptt
    base = bptt if torch.rand((), generator=generator).item() < 0.95 else bptt / 2
    length = max(5, int(base + 5 * torch.randn((), generator=generator).item()))
    return min(length, longest_window(bptt, variable))


def pass_start(bptt: int, random_offset: bool, generator: torch.Generator | None) -> int:
    """The row where a pass over the training data starts: 0, or with `random_offset` a row drawn uniformly
    from [0, bptt), so that fixed-length windows cut the stream at other places in every pass. lamb starts
    its streams at a random sentence instead; both keep windows from always spanning the same tokens."""
    if not random_offset:
        return 0
    return int(torch.randint(bptt, (), generator=generator))


def bptt_windows(
    source: torch.Tensor,
    bptt: int,
    variable: bool,
    generator: torch.Generator | None,
    start: int = 0,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (start_index, inputs [L, B], targets [L, B]) over a batchified source [T, B], from row
    `start` to the end; targets are the inputs shifted by one, so every row but the first is a target once.

    With `variable`, L is drawn from `generator` (the global torch generator when None) only when a
    window is requested: to resume mid-split, store the next window's start index and
    `generator.get_state()` after a step and pass both back. With variable lengths, callers scale the
    learning rate by L / bptt themselves (as AWD-LSTM does) so short windows do not under-weight.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    i = start
    while i < source.size(0) - 1:
        length = min(window_length(bptt, variable, generator), source.size(0) - 1 - i)
        yield i, source[i : i + length], source[i + 1 : i + 1 + length]
        i += length


def eval_batches(
    tokens: torch.Tensor, batch_size: int, bptt: int, eos_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs [L, B], targets [L, B]) windows in which every token of `tokens` is a target
    exactly once, whatever the batch size; padding targets are IGNORE_INDEX.

    The first token is predicted from an `<eos>` (the line before it ended), so the stream has N
    (input, target) pairs, laid out as B contiguous columns of ceil(N / B) pairs each. The caller
    carries the recurrent state from one window to the next.
    """
    if tokens.dim() != 1 or tokens.numel() == 0 or batch_size < 1 or bptt < 1:
        raise ValueError(f"need non-empty 1-D tokens, batch_size >= 1 and bptt >= 1, got shape "
                         f"{tuple(tokens.shape)}, {batch_size}, {bptt}")
    n = tokens.size(0)
    rows = math.ceil(n / batch_size)
    pad = rows * batch_size - n
    # Padded inputs must still be valid ids; they only follow real tokens, so they change no score.
    inputs = torch.cat([tokens.new_full((1,), eos_id), tokens[:-1], tokens.new_full((pad,), eos_id)])
    targets = torch.cat([tokens, tokens.new_full((pad,), IGNORE_INDEX)])
    inputs = inputs.view(batch_size, rows).t().contiguous()
    targets = targets.view(batch_size, rows).t().contiguous()
    for i in range(0, rows, bptt):
        yield inputs[i : i + bptt], targets[i : i + bptt]
