"""A stage that continues another (``continues: 1``): its encoder and decoder carry on stage 1's cosine from where
stage 1 stopped, and stage 1's AdamW state, while the head starts its own warm-up and cosine."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from scripts.errors import UsageError
from scripts.networks import create_multi_task_model
from scripts.stage_checkpoints import OptimizerContinuation
from scripts.stages import learning_rate_schedule, parameter_groups

STEPS = 5  # iterations per epoch
STAGE_1 = {"epochs": 8, "schedule_epochs": 14, "trainable": ["encoder", "decoder"], "lr": 1e-3}
STAGE_3 = {"epochs": 6, "warmup_epochs": 1, "continues": 1, "trainable": ["encoder", "decoder", "cls_head"],
           "lr": 3e-3, "encoder_lr_factor": 1 / 3, "decoder_lr_factor": 1 / 3}  # fmt: skip
STAGES = {"1": STAGE_1, "3": STAGE_3}


def _train(optimizer: torch.optim.Optimizer, schedule: object, network: torch.nn.Module, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        network(torch.randn(2, 1, 32, 32))["seg"].mean().backward()
        optimizer.step()
        schedule.step()


def test_stage_3_carries_on_stage_1s_cosine_where_it_stopped() -> None:
    network = create_multi_task_model(base_filters=4, depth=3)
    first = torch.optim.AdamW(parameter_groups(network, STAGE_1))
    _train(first, learning_rate_schedule(first, STAGE_1, STAGES, STEPS), network, STAGE_1["epochs"] * STEPS)
    stopped = first.param_groups[0]["lr"]
    assert stopped == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 14)))  # part of the way down

    third = torch.optim.AdamW(parameter_groups(network, STAGE_3))
    schedule = learning_rate_schedule(third, STAGE_3, STAGES, STEPS)
    rates = {group["name"]: group["lr"] for group in third.param_groups}
    assert rates["encoder"] == rates["decoder"] == pytest.approx(stopped)
    assert rates["cls_head"] == 0.0  # the head's warm-up starts at 0
    rates_by_step = []
    for _ in range(STAGE_3["epochs"] * STEPS):
        third.step()
        schedule.step()
        rates_by_step.append({group["name"]: group["lr"] for group in third.param_groups})
    assert rates_by_step[STEPS - 1]["cls_head"] == pytest.approx(3e-3)  # warmed up after one epoch
    encoder = [rates["encoder"] for rates in rates_by_step]
    assert all(later <= earlier for earlier, later in itertools.pairwise(encoder))
    assert encoder[-1] == pytest.approx(0.0, abs=1e-12) and rates_by_step[-1]["cls_head"] == pytest.approx(0.0)


def test_a_stage_that_continues_none_keeps_monais_warm_up_and_cosine() -> None:
    network = create_multi_task_model(base_filters=4, depth=3)
    optimizer = torch.optim.AdamW(parameter_groups(network, {**STAGE_3, "continues": None}))
    schedule = learning_rate_schedule(optimizer, {**STAGE_3, "continues": None}, STAGES, STEPS)
    assert type(schedule).__name__ == "WarmupCosineSchedule"
    assert all(group["lr"] == 0.0 for group in optimizer.param_groups)


def _stage_1_checkpoint(network: torch.nn.Module, folder: Path) -> dict:
    first = torch.optim.AdamW(parameter_groups(network, STAGE_1))
    _train(first, learning_rate_schedule(first, STAGE_1, STAGES, STEPS), network, 3)
    (folder / "stage1").mkdir(parents=True)
    torch.save({"optimizer": first.state_dict()}, folder / "stage1" / "checkpoint_epoch=8.pt")
    return first.state_dict()


def test_the_encoder_and_decoder_get_stage_1s_adamw_state_and_the_head_none(tmp_path: Path) -> None:
    network = create_multi_task_model(base_filters=4, depth=3)
    saved = _stage_1_checkpoint(network, tmp_path)
    third = torch.optim.AdamW(parameter_groups(network, STAGE_3))
    OptimizerContinuation(third, network, STAGE_3, STAGES, str(tmp_path / "stage3"))()
    parameters = dict(network.named_parameters())
    carried = [parameters[f"encoder.{n}"] for n, _ in network.encoder.named_parameters()]
    carried += [parameters[f"decoder.{n}"] for n, _ in network.decoder.named_parameters()]
    assert len(carried) == len(saved["state"])
    for index, parameter in enumerate(carried):  # stage 1's optimizer held them in this order
        torch.testing.assert_close(third.state[parameter]["exp_avg_sq"], saved["state"][index]["exp_avg_sq"])
        assert float(third.state[parameter]["step"]) == 3.0
    assert not any(third.state[p] for p in network.cls_head.parameters())


def test_a_stage_with_nothing_to_continue_stops_naming_the_folder(tmp_path: Path) -> None:
    network = create_multi_task_model(base_filters=4, depth=3)
    third = torch.optim.AdamW(parameter_groups(network, STAGE_3))
    with pytest.raises(UsageError, match="stage 1 has no checkpoint_epoch"):
        OptimizerContinuation(third, network, STAGE_3, STAGES, str(tmp_path / "stage3"))()
