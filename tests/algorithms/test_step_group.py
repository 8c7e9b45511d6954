"""`StepGroup`: batches whose gradients make one optimizer step (SFLV2 in lockstep).

The oracle is the step on the union of the batches, which is what centralized training takes
on the batch that the devices share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitfed.algorithms.cnn import StepGroup


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _opt(net: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (5, 3, 4)
    ]


def _backward(
    net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_group_steps_as_one_batch_of_its_union(optimizer: str) -> None:
    grouped, union = _net(), _net()
    opt, union_opt = _opt(grouped, optimizer), _opt(union, optimizer)
    batches = _batches()
    for _ in range(3):  # three steps, so momentum and Adam's moments take part
        group = StepGroup()
        grads = []
        for i, (x, y) in enumerate(batches):
            grads.append(_backward(grouped, opt, x, y))
            group.add(opt, len(y), last=i == len(batches) - 1)
        x = torch.cat([b[0] for b in batches])
        whole = _backward(union, union_opt, x, torch.cat([b[1] for b in batches]))
        union_opt.step()
        # Each batch's input gradient is the union's, at the batch's own mean-loss scale.
        assert torch.allclose(grads[1] * 3 / 12, whole[5:8], atol=1e-7)
    for a, b in zip(grouped.parameters(), union.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert group.sums is None and group.n == 0  # closed: the next group starts empty


def test_a_group_of_one_is_the_plain_step_bit_for_bit() -> None:
    grouped, plain = _net(), _net()
    opt, plain_opt = _opt(grouped, "adam"), _opt(plain, "adam")
    x, y = _batches()[0]
    _backward(grouped, opt, x, y)
    StepGroup().add(opt, len(y), last=True)
    _backward(plain, plain_opt, x, y)
    plain_opt.step()
    for a, b in zip(grouped.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_closing_a_group_whose_last_device_is_gone_steps_on_the_rest() -> None:
    grouped, union = _net(), _net()
    opt, union_opt = _opt(grouped, "sgd"), _opt(union, "sgd")
    (x0, y0), (x1, y1), _ = _batches()
    group = StepGroup()
    for x, y in ((x0, y0), (x1, y1)):
        _backward(grouped, opt, x, y)
        group.add(opt, len(y), last=False)
    before = [p.detach().clone() for p in grouped.parameters()]
    group.close(opt)
    _backward(union, union_opt, torch.cat([x0, x1]), torch.cat([y0, y1]))
    union_opt.step()
    for a, b, old in zip(grouped.parameters(), union.parameters(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert not torch.equal(a, old)
    group.close(opt)  # an empty group takes no step
    for a, b in zip(grouped.parameters(), union.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
