"""Comparing llmkit with a peer library (bitsandbytes, ...) without letting the
peer's own bugs decide the outcome.

The pattern of every peer test: check llmkit against the reference (or the
committed golden vectors) unconditionally; check the peer's result against
the same reference; compare llmkit with the peer only where the peer is
right; and where the peer is wrong on this machine, end the test as an
expected failure whose reason names the peer, its version, the CPU
capability torch detected and the case, so the report shows the peer's bug
instead of CI failing on it (or the comparison hiding ours).
"""

from __future__ import annotations

import pytest
import torch


def cpu_capability() -> str:
    """torch's CPU capability string ("AVX512", "AVX2", "DEFAULT", ...): peers pick kernels by it."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "unknown"


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and values, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def describe_mismatch(theirs: torch.Tensor, expected: torch.Tensor) -> str:
    """Where and by how much `theirs` differs from `expected` (for the skip reason)."""
    if theirs.shape != expected.shape or theirs.dtype != expected.dtype:
        return f"shape/dtype {tuple(theirs.shape)} {theirs.dtype} instead of {tuple(expected.shape)} {expected.dtype}"
    a, b = theirs.reshape(-1), expected.reshape(-1)
    wrong = (a != b) & ~(torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a != b
    first = int(wrong.nonzero()[0]) if wrong.any() else -1
    if a.is_floating_point():
        err = (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item()
        return f"{int(wrong.sum())} of {a.numel()} elements differ from element {first} on, max |error| {err:.3g}"
    return f"{int(wrong.sum())} of {a.numel()} elements differ from element {first} on"


class PeerCheck:
    """Collects where a peer disagrees with the reference; ``finish`` turns that into an xfail."""

    def __init__(self, peer: str, version: str, case: str):
        self.peer, self.version, self.case = peer, version, case
        self.problems: list[str] = []

    def agrees(self, what: str, theirs: torch.Tensor, expected: torch.Tensor) -> bool:
        """True if the peer's `theirs` equals the reference's `expected` (NaN == NaN); else record it."""
        if same_values(theirs, expected):
            return True
        self.problems.append(f"{what}: {describe_mismatch(theirs, expected)}")
        return False

    def close(self, what: str, theirs: torch.Tensor, expected: torch.Tensor, rel: float) -> bool:
        """True if max |theirs - expected| <= rel * max |expected| (floored at 1e-30); else record it."""
        err = float((theirs.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-30))
        if err <= rel:
            return True
        self.problems.append(f"{what}: relative error {err:.3g} > {rel:g} against the reference")
        return False

    def finish(self) -> None:
        """Report the peer's errors, if any, as an expected failure (after llmkit's own checks passed)."""
        if self.problems:
            pytest.xfail(f"{self.peer} {self.version} is wrong on this CPU (torch cpu capability "
                         f"{cpu_capability()}) for {self.case}: " + "; ".join(self.problems))
