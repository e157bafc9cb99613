"""DP-SGD through Opacus (reference engine), behind the same interface as :mod:`dp.engine`.

Per-example gradients come from Opacus' ``GradSampleModule`` (hooks mode); clipping and noise
use ``DPOptimizer``'s own ``clip_and_accumulate`` / ``add_noise``; the sum is divided by the
expected batch size. Hugging Face BERT calls its position embedding with ids of shape
[1, L] broadcast over the batch, which breaks Opacus' embedding rule (Opacus issue #841):
callers must pass ``position_ids`` of shape [B, L] (``nlu.data.collate`` does).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# Opacus' hooks on the first layer fire without input gradients (token ids); harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class OpacusEngine:
    """Opacus-backed DP-SGD with the engine interface ``accumulate`` / ``finalize`` / ``detach``.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its trainable parameters are privatised. Hooks are attached in place.
    noise_multiplier : float
        sigma; noise std is ``noise_multiplier * max_grad_norm`` on the clipped sum.
    max_grad_norm : float
        C, the per-example clipping norm over all trainable parameters together.
    expected_batch_size : float
        Denominator of the update (``sample_rate * n`` under Poisson sampling).
    generator : dp.secure_random.NoiseSource or torch.Generator, optional
        Noise source. A NoiseSource (what runs pass) draws the noise itself, from its secure
        stream; Opacus' own ``add_noise`` (a torch.Generator, else Opacus' default generator)
        serves only a torch.Generator or None.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.model = model
        self.noise = generator if hasattr(generator, "add_normal_") else None  # a NoiseSource
        self.std = float(noise_multiplier) * float(max_grad_norm)
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # A throwaway SGD instance: DPOptimizer only needs the parameter list here; the
        # caller's own optimizer takes the step.
        self._dp = DPOptimizer(
            torch.optim.SGD(self.params, lr=0.0),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=None,
            loss_reduction="sum",
            generator=None if self.noise is not None else generator,
        )
        self.expected_batch_size = float(expected_batch_size)

    def accumulate(self, per_example_loss: torch.Tensor) -> torch.Tensor:
        """Backward the per-example losses [B]; clip each example and add to the running sum.

        Returns
        -------
        torch.Tensor, shape [B]
            Per-example gradient norms before clipping.
        """
        if per_example_loss.numel() == 0:
            return per_example_loss.detach()
        per_example_loss.sum().backward()
        grads = [p.grad_sample for p in self.params]
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)
        self._dp.clip_and_accumulate()
        for p in self.params:
            p.grad_sample = None
            p.grad = None
        return norms.detach()

    def finalize(self) -> None:
        """Set ``p.grad = (clipped sum + N(0, (sigma C)^2 I)) / expected_batch_size``; reset the sum."""
        for p in self.params:
            if p.summed_grad is None:  # nothing accumulated: noise-only step
                p.summed_grad = torch.zeros_like(p)
        if self.noise is not None:  # the secure stream, never a seeded PRNG
            for p in self.params:
                p.grad = self.noise.add_normal_(p.summed_grad, self.std).view_as(p)  # the sum is dropped below
        else:
            self._dp.add_noise()
        for p in self.params:
            p.grad = p.grad / self.expected_batch_size
            p.summed_grad = None

    def detach(self) -> None:
        """Remove Opacus' hooks from the model."""
        self.gsm._close()
