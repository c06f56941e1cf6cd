"""The training step's image domains and the estimation of a new domain's BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch

from scripts.engines import batch_domain, estimate_domain_statistics
from scripts.networks import create_multi_task_model
from scripts.networks.normalization import DomainBatchNorm2d


@pytest.mark.parametrize(("source", "domain"), [("brats", 0), ("kaggle", 1), (["kaggle", "kaggle"], 1)])
def test_batch_domain_follows_the_source(source: object, domain: int) -> None:
    assert batch_domain({"source": source}) == domain


@pytest.mark.parametrize("source", [["brats", "kaggle"], ["figshare"]])
def test_a_batch_of_mixed_or_unknown_sources_is_refused(source: list[str]) -> None:
    with pytest.raises(ValueError, match="one source out of"):
        batch_domain({"source": source})


def test_new_domain_statistics_are_the_mean_of_its_batches_and_nothing_else_moves() -> None:
    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2)
    model.freeze_encoder()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{"image": torch.randn(4, 1, 16, 16) * 2 + 3 * i} for i in range(3)]

    estimate_domain_statistics(model, batches, "kaggle")

    stem = model.encoder.stem
    with torch.no_grad():  # the first layer's statistics, computed directly: the mean over batches of batch means
        means = [stem.conv1(b["image"]).mean(dim=(0, 2, 3)) for b in batches]
    torch.testing.assert_close(stem.norm1.running_mean[1], torch.stack(means).mean(0))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("encoder.") and ("running_" in k or "num_batches" in k) for k in changed)
    assert all(torch.equal(m.running_mean[0], before[f"encoder.{n}.running_mean"][0])
               for n, m in model.encoder.named_modules() if isinstance(m, DomainBatchNorm2d))  # fmt: skip
    assert not any(m.training for m in model.encoder.modules()), "the frozen encoder went back to eval mode"
    assert all(m.momentum == 0.1 for m in model.encoder.modules() if isinstance(m, DomainBatchNorm2d))


def _joint_trainer(
    model: torch.nn.Module, batches: list[dict], kaggle_batches: list[dict], cls_weight: float,
    every_batch: bool = False, lr: float = 0.1,
):  # fmt: skip
    """The stage-3 training step as train.yaml builds it: MONAI's SupervisedTrainer with the bundle's
    prepare_batch, loss and alternating loader, the loader's cycle accumulated into one optimizer step (or, with
    ``every_batch``, a step per batch with the BraTS gradient carried)."""
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceFocalLoss

    from scripts.engines import MultiTaskBatch
    from scripts.handlers import BratsGradientCarry
    from scripts.loaders import AlternatingLoader, batches_per_step, carried_batches
    from scripts.losses import MultiTaskLoss, classification_loss

    stage = {"tasks": ["seg", "cls"], "step_every_batch": every_batch}
    loader = AlternatingLoader(batches, kaggle_batches, kaggle_steps=len(kaggle_batches) // len(batches))
    steps = batches_per_step(loader, stage)
    loss = MultiTaskLoss(
        DiceFocalLoss(sigmoid=True), classification_loss("focal"), cls_weight, steps, carried_batches(loader, stage)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=model, optimizer=optimizer,
        loss_function=loss, prepare_batch=MultiTaskBatch(("seg", "cls")), accumulation_steps=steps, decollate=False,
        train_handlers=[BratsGradientCarry(model, stage)],
    )  # fmt: skip
    return trainer, optimizer, loss


def _tiny_batches(seed: int = 0) -> tuple[list[dict], list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    brats = [
        {"image": torch.randn(4, 1, 16, 16, generator=generator), "source": ["brats"] * 4,
         "label": (torch.rand(4, 1, 16, 16, generator=generator) > 0.7).float(), "cls": torch.tensor([1, 0, 1, 0])}
    ]  # fmt: skip
    kaggle = [
        {"image": torch.randn(6, 1, 16, 16, generator=generator) + 2, "source": ["kaggle"] * 6,
         "cls": torch.tensor([1, 1, 0, 0, 1, 0])}
        for _ in range(3)
    ]  # fmt: skip
    return brats, kaggle


def _encoder_gradient_at_the_update(
    brats: list[dict], kaggle: list[dict], cls_weight: float = 2.0, every_batch: bool = False, lr: float = 0.1
):
    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2, cls_dropout=0.0)
    trainer, optimizer, _ = _joint_trainer(model, brats, kaggle, cls_weight, every_batch, lr)
    gradients: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(
        lambda *_: gradients.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
    )
    trainer.run()
    return gradients


def test_one_joint_step_is_one_update_whose_encoder_gradient_holds_the_segmentation_term() -> None:
    brats, kaggle = _tiny_batches()
    gradients = _encoder_gradient_at_the_update(brats, kaggle)
    assert len(gradients) == 1, "a BraTS batch and its three Kaggle batches make exactly one optimizer update"
    # Only the BraTS batch's mask changes: the update of the shared encoder changes with it.
    flipped = [{**brats[0], "label": 1 - brats[0]["label"]}]
    (changed,) = _encoder_gradient_at_the_update(flipped, kaggle)
    assert not torch.allclose(gradients[0], changed)


def test_the_accumulated_update_is_the_gradient_of_the_designs_loss() -> None:
    # L = L_seg + lambda * L_cls, with L_cls the mean classification loss of the step's four batches, computed by
    # hand in one graph, against what the trainer accumulated.
    from monai.losses import DiceFocalLoss

    from scripts.losses import classification_loss

    brats, kaggle = _tiny_batches(1)
    cls_weight = 2.0
    (accumulated,) = _encoder_gradient_at_the_update(brats, kaggle, cls_weight)
    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2, cls_dropout=0.0).train()
    seg_loss, cls_loss = DiceFocalLoss(sigmoid=True), classification_loss("focal")
    out = model(brats[0]["image"], domain=0)
    cls_terms = [cls_loss(out["cls"], brats[0]["cls"])]
    cls_terms += [cls_loss(model(b["image"], do_seg=False, domain=1)["cls"], b["cls"]) for b in kaggle]
    total = seg_loss(out["seg"], brats[0]["label"]) + cls_weight * torch.stack(cls_terms).mean()
    total.backward()
    expected = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
    torch.testing.assert_close(accumulated, expected, rtol=1e-4, atol=1e-6)


def test_only_a_stage_that_trains_both_tasks_accumulates_its_cycle() -> None:
    from scripts.loaders import AlternatingLoader, batches_per_step, carried_batches

    brats, kaggle = _tiny_batches()
    loader = AlternatingLoader(brats, kaggle, kaggle_steps=3)
    joint = {"tasks": ["seg", "cls"]}
    assert batches_per_step(loader, joint) == 4
    # The classification head stage and the cls-only baseline step on every batch, as the baselines always trained.
    assert batches_per_step(loader, {"tasks": ["cls"]}) == 1
    assert batches_per_step(brats, joint) == 1, "BraTS alone: nothing to accumulate"
    assert batches_per_step(AlternatingLoader(brats, [], kaggle_steps=3), joint) == 1
    assert batches_per_step(loader, {**joint, "step_every_batch": "true"}) == 1, "a step per batch, when asked"
    assert carried_batches(loader, {**joint, "step_every_batch": True}) == 4, "the BraTS gradient goes into 4 updates"
    assert carried_batches(loader, joint) == 1


def test_a_step_per_batch_carries_the_brats_gradient_into_every_kaggle_update() -> None:
    # step_every_batch: four updates for a BraTS batch and its three Kaggle batches; each Kaggle update is the BraTS
    # batch's gradient (L_seg + lambda * its L_cls / 4: its slices count once over the four updates) plus lambda
    # times that Kaggle batch's, all computed by hand at the same weights (learning rate 0, so that the weights stay
    # where the hand computation has them).
    from monai.losses import DiceFocalLoss

    from scripts.losses import classification_loss

    brats, kaggle = _tiny_batches(3)
    cls_weight = 2.0
    updates = _encoder_gradient_at_the_update(brats, kaggle, cls_weight, every_batch=True, lr=0.0)
    assert len(updates) == 4
    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2, cls_dropout=0.0).train()
    seg_loss, cls_loss = DiceFocalLoss(sigmoid=True), classification_loss("focal")

    def encoder_gradient(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in model.encoder.parameters()])

    out = model(brats[0]["image"], domain=0)
    brats_cls = cls_weight * cls_loss(out["cls"], brats[0]["cls"]) / (1 + len(kaggle))
    g_b = encoder_gradient(seg_loss(out["seg"], brats[0]["label"]) + brats_cls)
    expected = [g_b] + [
        g_b + encoder_gradient(cls_weight * cls_loss(model(b["image"], do_seg=False, domain=1)["cls"], b["cls"]))
        for b in kaggle
    ]
    for update, hand in zip(updates, expected, strict=True):
        torch.testing.assert_close(update, hand, rtol=1e-4, atol=1e-6)
    # and a Kaggle update changes when only the BraTS batch's mask does
    flipped = [{**brats[0], "label": 1 - brats[0]["label"]}]
    changed = _encoder_gradient_at_the_update(flipped, kaggle, cls_weight, every_batch=True, lr=0.0)
    assert not torch.allclose(updates[-1], changed[-1])


def test_the_weight_average_is_validated_and_training_goes_on_from_the_networks_own_weights() -> None:
    from ignite.engine import Engine, Events

    from scripts.handlers import WeightAverage

    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2, cls_dropout=0.0)
    seen: list[torch.Tensor] = []
    validator = Engine(lambda engine, batch: seen.append(model.cls_head.mlp[-1].weight.detach().clone()))
    average = WeightAverage(model, validator, decay=0.5, every=2)

    def step(engine: Engine, batch: int) -> None:
        with torch.no_grad():
            if engine.state.iteration % 2 == 0:  # one optimizer update every second iteration
                for parameter in model.parameters():
                    parameter.add_(1.0)

    trainer = Engine(step)
    average.attach(trainer)
    start = model.cls_head.mlp[-1].weight.detach().clone()
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run([0]))
    trainer.run(range(4), max_epochs=1)
    # Updates of +1 at iterations 2 and 4, averaged after each: the first copies (start + 1), the second halves
    # the way to start + 2: the validator saw start + 1.5, and the network kept its own start + 2.
    torch.testing.assert_close(seen[0], start + 1.5)
    torch.testing.assert_close(model.cls_head.mlp[-1].weight.detach(), start + 2)
    # The average survives a resume through the stage's checkpoint.
    restored = WeightAverage(model, Engine(lambda e, b: None), decay=0.5, every=2)
    restored.load_state_dict(average.state_dict())
    torch.testing.assert_close(restored.average.module.cls_head.mlp[-1].weight, start + 1.5)
    assert WeightAverage(model, validator, decay=0.0).state_dict() == {}, "decay 0: no average at all"


def _hand_gradients(brats: list[dict], kaggle: list[dict], cls_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder gradients of the joint step's BraTS batch and of its Kaggle batches, each computed by hand."""
    from monai.losses import DiceFocalLoss

    from scripts.losses import classification_loss

    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2, cls_dropout=0.0).train()
    seg_loss, cls_loss = DiceFocalLoss(sigmoid=True), classification_loss("focal")
    steps = 1 + len(kaggle)
    out = model(brats[0]["image"], domain=0)
    (seg_loss(out["seg"], brats[0]["label"]) + cls_weight * cls_loss(out["cls"], brats[0]["cls"]) / steps).backward()
    brats_grad = torch.cat([p.grad.flatten().clone() for p in model.encoder.parameters()])
    model.zero_grad()
    kaggle_terms = [cls_loss(model(b["image"], do_seg=False, domain=1)["cls"], b["cls"]) for b in kaggle]
    (cls_weight * torch.stack(kaggle_terms).sum() / steps).backward()
    return brats_grad, torch.cat([p.grad.flatten() for p in model.encoder.parameters()])


@pytest.mark.parametrize("project", [False, True])
def test_the_gradient_conflict_is_measured_and_projected_as_pcgrad_says(project: bool) -> None:
    from scripts.handlers import GradientConflict

    brats, kaggle = _tiny_batches(7)
    cls_weight = 5.0
    g_b, g_k = _hand_gradients(brats, kaggle, cls_weight)
    dot = torch.dot(g_b, g_k)
    assert dot < 0, "the case under test: the Kaggle batches' gradient points against the BraTS batch's"

    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2, cls_dropout=0.0)
    trainer, optimizer, _ = _joint_trainer(model, brats, kaggle, cls_weight)
    GradientConflict(model, {"project_conflicts": project}, every=trainer.accumulation_steps).attach(trainer)
    updates: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(
        lambda *_: updates.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
    )
    trainer.run()

    assert trainer.state.metrics["encoder_grad_cosine"] == pytest.approx(float(dot / (g_b.norm() * g_k.norm())), 1e-3)
    assert trainer.state.metrics["encoder_grad_conflicts"] == 1.0
    expected = g_b + (g_k - dot / g_b.pow(2).sum() * g_b if project else g_k)
    torch.testing.assert_close(updates[0], expected, rtol=1e-4, atol=1e-6)
    if project:
        assert torch.dot(updates[0] - g_b, g_b) == pytest.approx(0.0, abs=1e-6 * float(g_b.norm() ** 2))
    assert trainer.state.metrics["encoder_grad_norm_ratio"] == pytest.approx(float(g_k.norm() / g_b.norm()), 1e-3)


def test_the_kaggle_gradient_can_be_capped_at_a_share_of_the_brats_gradients_norm() -> None:
    from scripts.handlers import GradientConflict

    brats, kaggle = _tiny_batches(7)
    g_b, g_k = _hand_gradients(brats, kaggle, 5.0)
    cap = 0.5 * float(g_k.norm() / g_b.norm())  # half the Kaggle gradient's own size: the cap bites
    torch.manual_seed(0)
    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2, cls_dropout=0.0)
    trainer, optimizer, _ = _joint_trainer(model, brats, kaggle, 5.0)
    GradientConflict(model, {"max_kaggle_grad_ratio": cap}, every=trainer.accumulation_steps).attach(trainer)
    updates: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(
        lambda *_: updates.append(torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
    )
    trainer.run()
    torch.testing.assert_close(updates[0], g_b + 0.5 * g_k, rtol=1e-4, atol=1e-6)


def test_the_gradient_options_take_command_line_text_and_refuse_nonsense() -> None:
    from scripts.errors import UsageError
    from scripts.handlers import GradientConflict

    model = create_multi_task_model(base_filters=4, depth=2, num_domains=2)
    assert GradientConflict(model, {"project_conflicts": "false"}).project is False  # bool("false") would be True
    assert GradientConflict(model, {"project_conflicts": "true", "max_kaggle_grad_ratio": "0.5"}).max_ratio == 0.5
    with pytest.raises(UsageError, match="project_conflicts must be true or false, got 'maybe'"):
        GradientConflict(model, {"project_conflicts": "maybe"})
    with pytest.raises(UsageError, match="max_kaggle_grad_ratio must be a number or null, got 'half'"):
        GradientConflict(model, {"max_kaggle_grad_ratio": "half"})
