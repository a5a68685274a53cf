"""Choosing the next token from a row of logits: greedy, or a draw after temperature, top-k and top-p filtering.

Draws use ``torch.multinomial`` with the caller's generator, one draw per row and step, so two runs that reach
the same logits (the KV-cache path and the full recomputation) draw the same tokens.
"""
import math

import torch


def check_sampling(greedy: bool, temperature: float, top_k: int | None, top_p: float | None, vocab: int):
    """ValueError naming the sampling argument that no draw can use."""
    if not isinstance(greedy, bool):
        raise ValueError(f"greedy must be a bool, got {greedy!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an integer in [1, {vocab}], got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """``logits / temperature`` with the tokens outside the top-k and outside the smallest set whose probability
    reaches ``top_p`` set to -inf (the most likely token always stays). ``logits``: [B, V]."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # a token is dropped when the tokens before it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, greedy: bool = False, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [B]: the argmax of ``logits`` [B, V] when ``greedy``, else one draw from the filtered softmax."""
    if greedy:
        return logits.argmax(-1)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1, dtype=torch.promote_types(filtered.dtype, torch.float32))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
