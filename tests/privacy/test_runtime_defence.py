"""The product's device runtime applies the defences: `simulate` and `serve` run defended.

The round body carries noise and NoPeek; the device keys the noise with its own secret, so the
aggregator, which knows every other part of the key, cannot regenerate and subtract it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from splitfed.checkpoint import load_model
from splitfed.client import ClientRuntime
from splitfed.config import TrainConfig
from splitfed.data.dataset import EmotionDataset
from splitfed.data.synth import SynthConfig, generate_synth
from splitfed.defences import DEFENCES, DefenceConfig, received
from splitfed.errors import UserError
from splitfed.model import ModelConfig, build_split_model, seeded
from splitfed.simulate import SimSpec, simulate
from splitfed.training import prefixed, state_to_numpy
from splitfed.wire import MsgType, Sequencer, decode, encode

MODEL = ModelConfig(widths=(8, 16, 16), cut=1)


@pytest.fixture(scope="module")
def data() -> EmotionDataset:
    return generate_synth(SynthConfig(identities=8, per_emotion=2, seed=5))


def round_start(defence: DefenceConfig, model: ModelConfig = MODEL) -> bytes:
    """A ROUND_START as the aggregator sends it, with this defence in the body."""
    client, _ = build_split_model(model, 0)
    body = {
        "algo": "sl",
        "mode": "split",
        "seed": 0,
        "client_index": 0,
        "model": model.model_dump(mode="json"),
        "train": TrainConfig(batch_size=8, syncs_per_round=1).model_dump(mode="json"),
        "weights_version": 0,
        "lr": 1e-3,
        "defence": defence.model_dump(mode="json", include={"noise", "nopeek"}),
    }
    msg = Sequencer("aggregator", "r").make(
        MsgType.ROUND_START, 0, body, prefixed(state_to_numpy(client), "w.")
    )
    return encode(msg)


def first_smashed(data: EmotionDataset, defence: DefenceConfig, secret: int) -> np.ndarray:
    runtime = ClientRuntime("client-00", "r", data, secret=secret)
    (raw,) = runtime.handle_bytes(round_start(defence))
    msg = decode(raw)
    assert msg.env.type is MsgType.SMASHED
    return received(msg.tensors).numpy()


def test_noise_is_applied_and_keyed_with_the_device_secret(data: EmotionDataset) -> None:
    plain = first_smashed(data, DEFENCES["none"], secret=1)
    # Without a defence the secret changes nothing: the wire is the client half's output.
    np.testing.assert_array_equal(plain, first_smashed(data, DEFENCES["none"], secret=2))
    noisy = first_smashed(data, DefenceConfig(noise=1.0), secret=1)
    assert not np.allclose(noisy, plain)
    # Relative to each sample's own scale: about one standard deviation of noise.
    ratio = (noisy - plain).reshape(len(plain), -1).std(1) / plain.reshape(len(plain), -1).std(1)
    assert 0.8 < float(np.median(ratio)) < 1.2
    np.testing.assert_array_equal(noisy, first_smashed(data, DefenceConfig(noise=1.0), secret=1))
    other = first_smashed(data, DefenceConfig(noise=1.0), secret=2)
    assert not np.allclose(noisy, other)


def test_noise_cannot_be_replayed_from_what_the_aggregator_knows(data: EmotionDataset) -> None:
    """The aggregator knows the weights, the seed, round, client and step: regenerating the
    noise from those alone (any secret it might guess, here 0) does not give the clean batch."""
    noisy = first_smashed(data, DefenceConfig(noise=1.0), secret=12345)
    guess = first_smashed(data, DefenceConfig(noise=1.0), secret=0)
    plain = first_smashed(data, DEFENCES["none"], secret=0)
    assert np.abs((noisy - (guess - plain)) - plain).mean() > 0.3 * np.abs(plain).mean()


def test_a_fresh_runtime_draws_its_own_secret(data: EmotionDataset) -> None:
    a, b = ClientRuntime("a", "r", data), ClientRuntime("b", "r", data)
    assert a.secret != b.secret


def test_simulate_with_defence_none_is_the_plain_run(data: EmotionDataset, tmp_path: Path) -> None:
    spec = {"model": MODEL, "train": TrainConfig(batch_size=8)}
    plain = simulate(data, SimSpec("sl", 2, 1, out_dir=tmp_path / "plain", **spec))  # type: ignore[arg-type]
    same = simulate(
        data,
        SimSpec("sl", 2, 1, out_dir=tmp_path / "none", defence=DEFENCES["none"], **spec),  # type: ignore[arg-type]
    )
    assert plain["final"] == same["final"]
    assert same["defence"] == DEFENCES["none"].model_dump(mode="json")
    _, a, _ = load_model(tmp_path / "plain" / "checkpoint")
    _, b, _ = load_model(tmp_path / "none" / "checkpoint")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    noisy = simulate(
        data,
        SimSpec(
            "sl",
            2,
            1,
            out_dir=tmp_path / "noisy",
            defence=DefenceConfig(noise=1.0, nopeek=1.0),
            **spec,  # type: ignore[arg-type]
        ),
    )
    assert noisy["defence"]["noise"] == 1.0
    _, c, _ = load_model(tmp_path / "noisy" / "checkpoint")
    assert not all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values())
    )


def test_defence_cut_and_compression_reach_the_run(data: EmotionDataset, tmp_path: Path) -> None:
    m = simulate(
        data,
        SimSpec(
            "sflv1", 2, 1, model=ModelConfig(widths=(8, 16, 16), cut=1),
            train=TrainConfig(batch_size=8), defence=DefenceConfig(cut=2, compression="int8"),
        ),
    )  # fmt: skip
    assert m["model"]["cut"] == 2
    assert m["train"]["compression"] == "int8"


def test_defence_with_an_algorithm_without_smashed_data_is_a_user_error(
    data: EmotionDataset,
) -> None:
    with pytest.raises(UserError, match="--defence"):
        simulate(data, SimSpec("fedavg", 2, 1, defence=DefenceConfig(noise=1.0)))


def test_nopeek_is_applied_on_the_device(data: EmotionDataset) -> None:
    """Same batch and gradient; with NoPeek the client half steps differently."""

    def step(defence: DefenceConfig) -> dict[str, torch.Tensor]:
        runtime = ClientRuntime("client-00", "r", data, secret=1)
        (raw,) = runtime.handle_bytes(round_start(defence))
        smashed = decode(raw)
        grad = np.ones_like(received(smashed.tensors).numpy(), dtype=np.float32) * 1e-3
        body = {"step": 0, "loss": 1.0}
        reply = Sequencer("aggregator", "r")
        reply.seq = 10
        msg = reply.make(
            MsgType.GRADIENTS, 0, body, {"grad": grad}, reply_to=smashed.env.message_id
        )
        with seeded(0):
            out = runtime.handle_bytes(encode(msg))
        assert decode(out[0]).env.type is MsgType.SMASHED
        assert runtime.client_net is not None
        return {k: v.clone() for k, v in runtime.client_net.state_dict().items()}

    plain, peek = step(DEFENCES["none"]), step(DefenceConfig(nopeek=1.0))
    assert any(not torch.equal(plain[k], peek[k]) for k in plain)
