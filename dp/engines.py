"""The one place a DP-SGD engine is chosen by name (``dp_engine`` setting)."""

from __future__ import annotations

from torch import nn

ENGINES = ("dpfl", "opacus")


def make_engine(
    name: str,
    model: nn.Module,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator=None,
):
    """Build the DP-SGD engine ``name`` ("dpfl": our batched engine; "opacus": the reference).

    ``generator`` is the noise source: a :class:`dp.secure_random.NoiseSource` (what runs pass)
    or a torch.Generator. Both engines draw a NoiseSource's noise from its secure stream (the
    Opacus reference clips with Opacus and adds that noise itself, never through a seeded PRNG).

    Both expose ``accumulate(per_example_loss[B]) -> norms[B]``, ``finalize()`` and ``detach()``,
    and both implement the same mechanism, so the privacy events they produce are identical.

    Raises
    ------
    ValueError
        For an unknown engine name.
    """
    kwargs = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=generator,
    )
    if name == "opacus":
        from dp.opacus_engine import OpacusEngine

        return OpacusEngine(model, **kwargs)
    if name == "dpfl":
        from dp.engine import DPSGDEngine

        return DPSGDEngine(model, **kwargs)
    raise ValueError(f"--dp-engine: unknown engine {name!r}; choose one of {ENGINES}")
