"""Perplexity of a loaded causal LM on a fixed text: how much a precision costs in quality.

One forward pass over the whole text (it must fit the model's context), next-token cross-entropy averaged over
every predicted token, `exp` of that. Used by `benchmarks/perplexity.py` and the quality test, which compare each
precision with bf16 on the same text.
"""

from __future__ import annotations

import math
from typing import Any


def perplexity(model: Any, tokenizer: Any, text: str) -> float:
    """exp(mean next-token negative log-likelihood) of `text` under `model` (one forward pass, fp32 loss)."""
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    if ids.shape[1] < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")
    return math.exp(float(nll))
