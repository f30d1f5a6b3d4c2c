"""Where the tests' numeric tolerances come from: measured float32 rounding, never a figure picked to pass.

A comparison of two float32 routes to the same number (microbatches, ranks, the hidden-state path,
another kernel) may differ by float32 rounding and by nothing else. That rounding depends on the
CPU's kernels, so it is measured in the same test: the same computation in float64 shows how far
float32 lands from the exact value (``float64_floor``, ``ce_floor``), and the comparison is allowed
``ROUNDING_GROWTH`` times that. Where nothing is measured, ``float32_rounding_bound`` counts ulps.
A real mistake (a wrong microbatch weighting) moves the tiny model's weights by ~1e-3
(``test_microbatch_invariance_is_not_free``), orders of magnitude above these bounds (~1e-7).
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
# Two float32 routes to one result each land within the measured float32 rounding of the exact
# value (so within 2x of each other); another order of the same sums may round up to 5x more.
ROUNDING_GROWTH = 10


def float32_rounding_bound(magnitude: float, ulps: float) -> float:
    """``ulps`` float32 roundings of ``magnitude``: a sum of N terms rounds by at most N ulps of the
    sum of their magnitudes; say at each call site which sum the count stands for."""
    return ulps * FLOAT32_EPS * abs(float(magnitude))


def float64_floor(weights32: dict[str, torch.Tensor], weights64: dict[str, torch.Tensor]) -> float:
    """The float32 rounding of a training run: how far its final weights end from the same run with
    the model in float64 (at least one float32 ulp of the largest weight)."""
    diff = max(float((weights32[k].double() - weights64[k].double()).abs().max()) for k in weights32)
    largest = max(float(w.abs().max()) for w in weights64.values() if w.is_floating_point())
    return max(diff, FLOAT32_EPS * largest)


def measured_floor(value32, value64) -> float:
    """How far a float32 result lies from the same computation in float64 (floats or tensors), at
    least one float32 ulp of the largest value."""
    diff = torch.as_tensor(value32, dtype=torch.float64) - torch.as_tensor(value64, dtype=torch.float64)
    return max(float(diff.abs().max()), FLOAT32_EPS * float(torch.as_tensor(value64).abs().max()))


def hf_ce_floor(model, batch) -> float:
    """The float32 rounding of a batch's cross-entropy: the Hugging Face loss of ``model`` (a Composer
    ``HuggingFaceModel``, float32) on ``batch`` against the same in float64 (at least one ulp)."""
    import copy

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        loss32 = model.model(**inputs).loss.item()
        loss64 = copy.deepcopy(model.model).double()(**inputs).loss.item()
    return max(abs(loss32 - loss64), FLOAT32_EPS * abs(loss64))


def ce_floor(tokenizer, n: int = 4) -> float:
    """``hf_ce_floor`` of the tiny model on the first ``n`` synthetic samples (the tests' first batch)."""
    from tests.helpers.synthetic import CoTDataset, collate
    from tests.helpers.training import build_model

    return hf_ce_floor(build_model(tokenizer), collate([CoTDataset(tokenizer, n)[i] for i in range(n)]))


def run_floor(weights32: dict[str, torch.Tensor], tokenizer, algorithms, **run_kwargs) -> float:
    """``float64_floor`` of ``tests.helpers.training.run(tokenizer, algorithms, **run_kwargs)``, whose
    float32 final weights are ``weights32``: the same run again with the model in float64."""
    from tests.helpers.training import run, weights

    _, model64, _ = run(tokenizer, algorithms, dtype=torch.float64, **run_kwargs)
    return float64_floor(weights32, weights(model64))
