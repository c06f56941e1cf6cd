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
