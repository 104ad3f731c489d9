"""The check every "compiled equals eager" training test makes, in one place."""

from typing import Optional

import torch


def assert_compiled_matches_eager(
    model: torch.nn.Module, x: torch.Tensor, tol: float, grad_rtol: Optional[float] = None
):
    """``torch.compile(model, fullgraph=True)`` gives the eager outputs (to ``tol``) and the eager gradients of
    every parameter for the squared outputs' sum (to ``tol`` of each gradient's largest entry, and ``grad_rtol``,
    default ``tol``, relatively)."""
    params = list(model.parameters())
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    for g, e in zip(torch.autograd.grad(out.square().sum(), params), expected_grads):
        torch.testing.assert_close(g, e, rtol=grad_rtol or tol, atol=tol * e.abs().max().item())
