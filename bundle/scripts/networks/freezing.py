"""Freezing a component for staged training: no gradients and no BatchNorm/Dropout training behaviour."""

from __future__ import annotations

from torch import nn


class FreezableMixin(nn.Module):
    """Adds ``freeze()`` / ``unfreeze()`` to a network component.

    A frozen component gets ``requires_grad=False`` on its parameters and stays in eval mode even when a parent
    calls ``train()``: otherwise BatchNorm running statistics would keep moving (and Dropout keep dropping) in
    a part that is meant to be fixed, e.g. the encoder while stage 2 trains the classification head.
    """

    def freeze(self) -> None:
        """Stop gradients and keep the component in eval mode until :meth:`unfreeze`."""
        self.frozen = True
        self.requires_grad_(False)
        self.train(self.training)

    def unfreeze(self) -> None:
        """Make the component trainable again; its mode follows its parent's from the next ``train()`` call."""
        self.frozen = False
        self.requires_grad_(True)

    def train(self, mode: bool = True) -> FreezableMixin:
        super().train(mode and not getattr(self, "frozen", False))
        return self
