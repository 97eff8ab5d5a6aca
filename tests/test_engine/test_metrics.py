"""The loss split by σ range: binning at the edges, skipped steps left out."""

import pytest
import torch

from pgv25.engine.metrics import SigmaBinnedLoss


def test_losses_land_in_their_sigma_bins():
    binned = SigmaBinnedLoss(torch.device("cpu"))
    binned.add(torch.tensor([0.1, 0.5, 1.9, 2.0, 80.0]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    binned.commit(keep=True)
    assert binned.means() == pytest.approx({"loss_sigma/0-0.5": 1.0, "loss_sigma/0.5-2": 2.5,
                                            "loss_sigma/2-10": 4.0, "loss_sigma/10+": 5.0})
    assert binned.means() == {}  # the window restarts after each log line


def test_a_skipped_step_does_not_enter_the_means():
    binned = SigmaBinnedLoss(torch.device("cpu"))
    binned.add(torch.tensor([0.2]), torch.tensor([float("nan")]))
    binned.commit(keep=False)
    binned.add(torch.tensor([0.3]), torch.tensor([2.0]))
    binned.commit(keep=True)
    assert binned.means() == {"loss_sigma/0-0.5": 2.0}
