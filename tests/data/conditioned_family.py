"""A family with a conditioning slot, for the tests: the demo family whose denoiser also reads
one reference image per item (``name-ref.png`` beside ``name.png``), as an edit model would.

The reference goes through a tiny convolution into 16 tokens of the text width, which the
denoiser's cross-attention reads after the prompt's tokens: the prediction depends on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.models.base import LoadedModel, TextEncoding, with_conditioning
from modules.models.demo import SPEC as DEMO_SPEC
from modules.models.demo.family import DemoFamily
from modules.models.spec import ConditioningKind

REFERENCE = ConditioningKind(name="reference", source="references")
SPEC = replace(
    DEMO_SPEC,
    conditioning=(REFERENCE,),
    implementation="tests.data.conditioned_family:ReferenceFamily",
)
"""The demo family's declaration with one reference image per item (registered as ``demo``
by a test that runs it: ``monkeypatch.setitem(registry.SPECS, "demo", SPEC)``)."""
TWO_REFERENCES = replace(REFERENCE, most=2)
SPEC_TWO = replace(SPEC, conditioning=(TWO_REFERENCES,))
"""The same with up to two references per item, as an edit model with several takes them."""
WITH_CAPTION = replace(REFERENCE, with_caption=True)
SPEC_WITH_CAPTION = replace(SPEC, conditioning=(WITH_CAPTION,))
"""The same with an encoding that reads the caption (as Qwen-Image-Edit's prompt does)."""
TOKENS_KEY = "reference_tokens"
REFERENCE_SIDE = 32
"""References are resized to 32 x 32 (each pipeline resizes its own way), then 8 x 8 patches."""


class ReferenceFamily(DemoFamily):
    """The demo family plus ``encode_conditioning``: implements ``ConditionedFamily``."""

    def __init__(self, options=None) -> None:
        super().__init__(options)
        generator = torch.Generator().manual_seed(3)
        self.reference_encoder = torch.nn.Conv2d(3, 64, kernel_size=8, stride=8)
        with torch.no_grad():
            for parameter in self.reference_encoder.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        self.calls = 0
        self.captions: list[str | None] = []
        """The caption given with each encoding (None: none given)."""

    @torch.no_grad()
    def encode_conditioning(
        self,
        model: LoadedModel,
        kind: str,
        images: Sequence[Tensor],
        *,
        frames: int = 1,
        caption: str | None = None,
    ) -> TextEncoding:
        assert kind == REFERENCE.name, kind
        self.calls += 1
        self.captions.append(caption)
        pixels = torch.stack(
            [
                F.interpolate(image[None], size=(REFERENCE_SIDE, REFERENCE_SIDE), mode="area")[0]
                for image in images
            ]
        )  # (R, 3, 32, 32)
        features = self.reference_encoder(pixels)  # (R, 64, 4, 4)
        tokens = features.flatten(2).transpose(1, 2).reshape(1, -1, 64)  # (1, R * 16, 64)
        return {TOKENS_KEY: tokens}

    def predict(
        self, model: LoadedModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        # (B, L, 64) prompt tokens then (B, 16, 64) reference tokens, one sequence.
        embeds = torch.cat([text["embeds"], text[TOKENS_KEY].to(text["embeds"].dtype)], dim=1)
        return super().predict(model, noisy, timesteps, {"embeds": embeds})

    def sample(
        self,
        model: LoadedModel,
        text: TextEncoding,
        *,
        conditioning: TextEncoding | None = None,
        **settings,
    ) -> Tensor:
        """The demo's sampler with each prompt's references (batch-first, as the trainer's
        samples encode them) read beside its prompt; without guidance, whose empty prompt
        would need references too."""
        assert conditioning is not None, "a reference family samples with its references"
        settings["guidance"] = 1.0
        return super().sample(model, with_conditioning(text, conditioning), **settings)
