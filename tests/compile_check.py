"""Shared check: a function under torch.compile(fullgraph=True) gives the eager value and gradients."""
import torch


def assert_compiled_matches_eager(fn, *tensors, backend: str = "aot_eager") -> None:
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    leaves = [t.clone().requires_grad_() for t in tensors]
    eager_leaves = [t.clone().requires_grad_() for t in tensors]
    value = compiled(*leaves)
    value.backward()
    expected = fn(*eager_leaves)
    expected.backward()
    torch.testing.assert_close(value, expected)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
