"""The weight-change attack: it sees what a device's part really changes, and it reads it."""

from __future__ import annotations

import copy

import pytest
import torch

from splitfed.checkpoint import load_model
from splitfed.config import TrainConfig
from splitfed.data.batches import to_tensor
from splitfed.data.dataset import EmotionDataset
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.defences import DefenceConfig
from splitfed.privacy.attack import AttackConfig
from splitfed.privacy.report import People, attack_people
from splitfed.privacy.updates import (
    ChangeBasis,
    UpdateAttackConfig,
    measure_update_leakage,
    observe_part,
    play_parts,
)
from splitfed.simulate import SimSpec, simulate
from splitfed.training import make_optimizer

SGD = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.05)


@pytest.fixture(scope="module")
def data() -> EmotionDataset:
    return generate_synth(SynthConfig(identities=10, per_emotion=2, seed=3))


@pytest.fixture(scope="module")
def halves(
    data: EmotionDataset, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, torch.nn.Module]:
    out = tmp_path_factory.mktemp("sflv1")
    simulate(data, SimSpec("sflv1", 2, 2, out_dir=out))
    _, client, server = load_model(out / "checkpoint")
    return client, server


@pytest.fixture(scope="module")
def people(data: EmotionDataset) -> People:
    return attack_people(data, seed=0)


def test_the_change_of_one_sgd_step_is_the_gradient_of_the_returned_one(
    halves: tuple[torch.nn.Module, torch.nn.Module], people: People
) -> None:
    """What the attacker records is what the device trained with: the server's gradient,
    pushed through the client half, is exactly the step (SGD, no momentum, no decay)."""
    client, server = halves
    device = copy.deepcopy(client)
    images, labels = people.victims.images[:4], people.victims.labels[:4]
    opt = make_optimizer(device.parameters(), SGD)
    part = observe_part(device, server, opt, [(images, labels)], DefenceConfig(), "fp32", (0,))
    replay = copy.deepcopy(client)
    replay.load_state_dict(part.before)
    replay.train()
    (replay(to_tensor(images)) * part.grads[0]).sum().backward()
    for name, p in replay.named_parameters():
        assert p.grad is not None
        step = part.after[name] - part.before[name]
        torch.testing.assert_close(step, -SGD.lr * p.grad, rtol=1e-4, atol=1e-7)
    # the running statistics moved too: they are in what the device uploads
    moved = [k for k in part.before if "running_mean" in k]
    assert moved and any(not torch.equal(part.before[k], part.after[k]) for k in moved)


def test_every_part_starts_from_the_global_half_and_the_optimizer_carries_over(
    halves: tuple[torch.nn.Module, torch.nn.Module], people: People
) -> None:
    client, server = halves
    aux = people.aux_train
    parts = play_parts(
        client, server, aux.images, aux.labels, 2, 1, 3, TrainConfig(), DefenceConfig(), "fp32", 0
    )
    assert len(parts) == 3
    assert all(o.wire.shape[0] == 2 and o.crops.shape[0] == 2 for o in parts)
    changes = torch.stack([o.change for o in parts])
    assert torch.allclose(changes.pow(2).mean(1), torch.ones(3), atol=1e-4)  # unit RMS
    assert not torch.allclose(changes[0], changes[1])
    basis = ChangeBasis(changes, 8)
    z = basis.project(changes)
    assert z.shape == (3, 8) and torch.all(z[:, 2:] == 0)  # rank 2 after centring


def test_the_attack_scores_the_victims_own_pictures_in_order(
    halves: tuple[torch.nn.Module, torch.nn.Module], people: People
) -> None:
    """The decoders train on the attacker's parts and are scored on the victim's: each
    reconstruction against the picture at its row, which re-identification relies on.

    Whether the change adds to the activations is measured at benchmark size
    (scripts/bench_update_privacy.py): on ten people it does not show."""
    client, server = halves
    cfg = UpdateAttackConfig(
        samples=32,
        decoder=AttackConfig(epochs=1, patience=1, width=4, batch_size=8, inversion_steps=0),
    )
    victims = people.victims
    leak = measure_update_leakage(
        client,
        server,
        (people.aux_train.images, people.aux_train.labels),
        (people.aux_val.images, people.aux_val.labels),
        (victims.images, victims.labels),
        2,
        2,
        3,
        SGD,
        DefenceConfig(noise=1.0),
        "fp32",
        cfg,
    )
    assert leak.reconstructions.shape == leak.crops.shape == (12, 1, *victims.input_shape[1:])
    assert len(leak.rows) == 12 and leak.rows.max() < len(victims.images)
    torch.testing.assert_close(leak.crops, torch.from_numpy(victims.images[leak.rows]) / 255.0)
    assert 0.0 <= float(leak.reconstructions.min()) and float(leak.reconstructions.max()) <= 1.0
    for score in (leak.ssim_with_update, leak.ssim_activations_only, leak.ssim_baseline):
        assert -1.0 <= score <= 1.0
