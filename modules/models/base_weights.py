"""The storage forms of the frozen base weights (``model.memory.base_weights``) that keep each
linear layer's weight as codes and a scale, dequantised to the compute dtype in the layer's own
forward: ``fp8_scaled``, ``int8`` and ``nf4``.

Each form replaces a ``torch.nn.Linear`` by a :class:`QuantisedLinear`, itself an
``nn.Linear`` (same ``in_features``, ``out_features`` and ``bias``), so peft puts its LoRA on it
like on any linear layer: the LoRA layer's ``base_layer`` is the quantised one, the LoRA weights
keep their own dtype (float32) and train, and the teacher (the adapter off) runs exactly the
stored base. The codes are kept in integer tensors (float8 codes as their bytes), so a later
``model.to(dtype)`` leaves them as they are.

With ``W`` a weight (out × in) and ``W_i`` its row ``i`` (one output channel):

- ``fp8_scaled``: ``W ≈ s_i * q`` with ``q`` float8 e4m3 and ``s_i = max|W_i| / 448`` (448 is
  e4m3's largest value), per output channel: each row uses the whole float8 range, so rows of
  small weights keep their relative precision (plain fp8 has only its few subnormals for values
  under 2^-6 and flushes those under 2^-10 to zero). A per-tensor scale
  (one ``s``) is the same formula with a (1, 1) scale: what some single files give.
- ``int8``: ``W ≈ s_i * q`` with ``q`` int8 in [-127, 127] and ``s_i = max|W_i| / 127`` (absmax
  per output channel), quantised by bitsandbytes (``int8_vectorwise_quant``). Weight-only: the
  activations stay in the compute dtype.
- ``nf4``: 4-bit NormalFloat (QLoRA's code: the 16 quantiles of a normal distribution), in
  blocks of 64 consecutive weights of a row, each block with its own absmax, by bitsandbytes
  (``quantize_4bit`` / ``dequantize_4bit``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from safetensors import safe_open

Form = Literal["fp8_scaled", "int8", "nf4"]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0
NF4_BLOCK = 64
"""Weights per nf4 block (bitsandbytes' and QLoRA's default): one float32 absmax per block."""


class QuantisedLinear(torch.nn.Linear):
    """A frozen linear layer whose weight is stored as ``codes`` and a ``weight_scale`` (see the
    module's docstring for each form), dequantised to ``compute_dtype`` for its forward only.

    ``weight`` holds the codes (int8 for ``int8``, the float8 bytes as uint8 for ``fp8_scaled``,
    two nf4 codes per byte for ``nf4``); ``weight_scale`` the float32 scale: (out, 1) per output
    channel, (1, 1) per tensor, or one absmax per block of 64 weights for ``nf4``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        form: Form,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.form = form
        self.compute_dtype = compute_dtype
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def dequantised(self) -> torch.Tensor:
        """The weight (out × in) in ``compute_dtype``, computed in float32 from the codes."""
        shape = (self.out_features, self.in_features)
        if self.form == "fp8_scaled":
            weight = self.weight.view(FP8).float() * self.weight_scale
        elif self.form == "int8":
            weight = self.weight.float() * self.weight_scale
        else:
            from bitsandbytes.functional import QuantState, dequantize_4bit

            state = QuantState(
                absmax=self.weight_scale,
                shape=torch.Size(shape),
                dtype=torch.float32,
                blocksize=NF4_BLOCK,
                quant_type="nf4",
            )
            weight = dequantize_4bit(self.weight, state)
        return weight.to(self.compute_dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(input, self.dequantised(), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form}, compute_dtype={self.compute_dtype}"


def quantise(linear: torch.nn.Linear, form: Form, compute_dtype: torch.dtype) -> QuantisedLinear:
    """``linear``'s weight in ``form`` (on the weight's device), its bias in ``compute_dtype``.
    A :class:`QuantisedLinear` of another form (a scaled fp8 file's layer) is stored again
    from its dequantised weight."""
    if isinstance(linear, QuantisedLinear):
        weight = linear.dequantised().detach()
    else:
        weight = linear.weight.detach()
    if form == "fp8_scaled":
        codes, scale = quantise_fp8_scaled(weight)
        codes = codes.view(torch.uint8)
    elif form == "int8":
        from bitsandbytes.functional import int8_vectorwise_quant

        codes, absmax, _ = int8_vectorwise_quant(weight.float().contiguous(), threshold=0.0)
        scale = (absmax.float() / INT8_MAX).unsqueeze(1)
    elif form == "nf4":
        from bitsandbytes.functional import quantize_4bit

        codes, state = quantize_4bit(
            weight.float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4"
        )
        scale = state.absmax
    else:
        raise ValueError(f"model.memory.base_weights: unknown storage form {form!r}")
    bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
    return QuantisedLinear(
        linear.in_features,
        linear.out_features,
        form=form,
        codes=codes,
        scale=scale,
        bias=bias,
        compute_dtype=compute_dtype,
    )


def quantise_fp8_scaled(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out × in) → float8 e4m3 codes (out × in) and float32 scales (out, 1), one per output
    channel: ``max|W_i| / 448``, so each row's largest weight maps to e4m3's largest value. A
    row of zeros gets the scale 1 (its codes are zero)."""
    weight = weight.float()
    amax = weight.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def store_quantised(
    denoiser: torch.nn.Module,
    form: Form,
    compute_dtype: torch.dtype,
    blocks: Sequence[torch.nn.Module] | None = None,
) -> int:
    """Replace, in place, each linear layer of ``blocks`` (the whole ``denoiser`` when None) by
    its :class:`QuantisedLinear` in ``form``; return how many. Layers already in ``form`` (a
    scaled fp8 file's, kept with the file's own scales) stay as they are. Layers that
    precision-sensitive names match keep their dtype: diffusers' defaults (norms, position and
    patch embeddings, ``proj_in`` / ``proj_out`` of the model itself) and the modules a
    diffusers class lists (``_keep_in_fp32_modules``, ``_skip_layerwise_casting_patterns``)."""
    inside = _module_ids(blocks if blocks is not None else [denoiser])
    skip = _skip_patterns(denoiser)
    chosen = [
        name
        for name, module in denoiser.named_modules()
        if (
            type(module) is torch.nn.Linear
            or (isinstance(module, QuantisedLinear) and module.form != form)
        )
        and id(module) in inside
        and not any(re.search(pattern, name) for pattern in skip)
    ]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = denoiser.get_submodule(parent_name)
        setattr(parent, child, quantise(getattr(parent, child), form, compute_dtype))
    return len(chosen)


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored."""
    tensors: Iterable[torch.Tensor] = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


COMFYUI_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
"""The ComfyUI quantisation formats :func:`read_single_file` dequantises (a float8 weight times
its ``weight_scale``, per tensor or per output channel)."""


def read_single_file(
    path: Path, dtype: torch.dtype, *, scaled: list[ScaledLayer] | None = None
) -> dict[str, torch.Tensor]:
    """A single-file transformer's tensors, with the layers ComfyUI stores as scaled float8
    dequantised to ``dtype`` (``weight.float() * scale``), so that a family's converter sees a
    plain checkpoint. Both ComfyUI forms:

    - the older one: a ``scaled_fp8`` marker tensor, and for each scaled layer ``<layer>.weight``
      in float8 and ``<layer>.scale_weight`` (float32, one per tensor); ``<layer>.scale_input``
      (for float8 matmuls) is dropped;
    - the newer one: ``<layer>.weight`` in float8 (or its bytes as uint8) and
      ``<layer>.weight_scale``, the layers and their format listed in the file's
      ``_quantization_metadata`` (JSON: ``{"layers": {"<layer>": {"format": ...}}}``) or in
      ``<layer>.comfy_quant`` tensors (the same JSON per layer, as bytes); ``<layer>.input_scale``
      is dropped.

    Unscaled float8, bfloat16 and float16 tensors are returned as stored (the loader casts
    them). ``scaled``, when given, receives each e4m3 layer's codes and scale, for
    :func:`keep_scaled_layers`. A format other than scaled float8 (ComfyUI's int8 or 4-bit
    forms) is a ValueError naming the layer and the format."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (no __iter__)
    layers: dict[str, dict[str, object]] = {}
    marker = [key for key in state if key == "scaled_fp8" or key.endswith(".scaled_fp8")]
    for key in marker:
        state.pop(key)
    for key in [key for key in state if key.endswith(".scale_weight")]:
        layer = key.removesuffix(".scale_weight")
        state[f"{layer}.weight_scale"] = state.pop(key)
        layers[layer] = {"format": "float8_e4m3fn"}
    if "_quantization_metadata" in metadata:
        layers.update(json.loads(metadata["_quantization_metadata"]).get("layers", {}))
    for key in [key for key in state if key.endswith(".comfy_quant")]:
        conf = state.pop(key)
        layers[key.removesuffix(".comfy_quant")] = json.loads(bytes(conf.tolist()).decode())
    for key in [k for k in state if k.endswith((".scale_input", ".input_scale"))]:
        state.pop(key)
    for layer, conf in layers.items():
        form = conf.get("format")
        if form not in COMFYUI_FP8_FORMATS:
            raise ValueError(
                f"layer {layer} is stored as {form!r}; only ComfyUI's scaled float8 forms "
                f"({', '.join(COMFYUI_FP8_FORMATS)}) are read"
            )
        weight, scale = state[f"{layer}.weight"], state.pop(f"{layer}.weight_scale").float()
        if weight.dtype == torch.uint8:  # float8 bytes in a uint8 container
            weight = weight.view(COMFYUI_FP8_FORMATS[str(form)])
        if scale.numel() > 1:  # one per output channel: (out,) or (out, 1)
            scale = scale.reshape(-1, *[1] * (weight.ndim - 1))
        state[f"{layer}.weight"] = (weight.float() * scale).to(dtype)
        if scaled is not None and weight.dtype == FP8:
            key = _content_key(state[f"{layer}.weight"])
            scaled.append(ScaledLayer(codes=weight, scale=scale, dtype=dtype, key=key))
    return state


@dataclass(frozen=True)
class ScaledLayer:
    """One scaled float8 layer of a single file, and how to find it again after the family's
    key conversion: ``key``, the shape and sum of its weight as loaded (:meth:`weight`)."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    key: tuple[tuple[int, ...], float]

    def weight(self) -> torch.Tensor:
        """The layer's weight as the file gives it, in the load dtype."""
        return (self.codes.float() * self.scale).to(self.dtype)


def keep_scaled_layers(
    denoiser: torch.nn.Module, scaled: Sequence[ScaledLayer], compute_dtype: torch.dtype
) -> int:
    """Store each linear layer of ``denoiser`` whose weight is one of the file's ``scaled``
    layers (the same values after the family's key conversion) as that layer's float8 codes and
    scale (a ``fp8_scaled`` :class:`QuantisedLinear`), so that a scaled fp8 file stays in 8 bits
    and dequantises to exactly what was loaded; return how many. Layers the conversion changed
    (fused or split) match none and keep the load dtype."""
    by_content: dict[tuple[tuple[int, ...], float], list[ScaledLayer]] = {}
    for layer in scaled:
        by_content.setdefault(layer.key, []).append(layer)
    chosen = []
    for name, module in denoiser.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight.detach()
        for layer in by_content.get(_content_key(weight), []):
            if torch.equal(layer.weight().to(weight.dtype), weight):
                chosen.append((name, layer))
                break
    for name, layer in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = denoiser.get_submodule(parent_name)
        linear = getattr(parent, child)
        scale = layer.scale.reshape(-1, 1) if layer.scale.numel() > 1 else layer.scale.reshape(1, 1)
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
        kept = QuantisedLinear(
            linear.in_features,
            linear.out_features,
            form="fp8_scaled",
            codes=layer.codes.view(torch.uint8).to(linear.weight.device),
            scale=scale.to(linear.weight.device),
            bias=bias,
            compute_dtype=compute_dtype,
        )
        setattr(parent, child, kept)
    return len(chosen)


def _content_key(weight: torch.Tensor) -> tuple[tuple[int, ...], float]:
    return tuple(weight.shape), float(weight.detach().float().sum())


def _module_ids(roots: Iterable[torch.nn.Module]) -> set[int]:
    return {id(module) for root in roots for module in root.modules()}


def _skip_patterns(denoiser: torch.nn.Module) -> tuple[str, ...]:
    own = (
        *(getattr(denoiser, "_skip_layerwise_casting_patterns", None) or ()),
        *(getattr(denoiser, "_keep_in_fp32_modules", None) or ()),
    )
    return (*DEFAULT_SKIP_MODULES_PATTERN, *own)


Blocks = Callable[[torch.nn.Module], Sequence[torch.nn.Module]]
"""A family's ``blocks``: the denoiser's repeated blocks, the layers these forms store."""
