"""Block swap (``model.memory.blocks_to_swap``): the swapped blocks' base weights are not in the
model between uses, and training computes exactly what it computes without the swap."""

import pytest
import torch
from pydantic import ValidationError

from modules.config.schema import MemoryConfig, ModelConfig
from modules.lora.lora import add_lora, lora_disabled
from modules.models import ModelLoadError, get_family, load_model
from modules.models.demo.family import build_demo_model
from modules.models.memory import apply_memory

CPU = torch.device("cpu")


def _wan_inputs():
    return torch.randn(2, 16, 2, 4, 4), {"embeds": torch.randn(2, 5, 32)}


def _flux2_inputs():
    return torch.randn(2, 128, 2, 3), {"embeds": torch.randn(2, 8, 48)}


def _qwen_image_inputs():
    mask = torch.ones(2, 5, dtype=torch.long)
    return torch.randn(2, 16, 4, 6), {"embeds": torch.randn(2, 5, 32), "mask": mask}


FAMILIES = {
    "wan": ("tiny_wan", _wan_inputs),
    "flux2": ("tiny_flux2", _flux2_inputs),
    "qwen_image": ("tiny_qwen_image", _qwen_image_inputs),
}
"""Family → (its tiny folder's fixture, a function giving noisy latents and text for it)."""


def _load(request, name, blocks_to_swap):
    fixture, _ = FAMILIES[name]
    config = ModelConfig(
        family=name,
        path=str(request.getfixturevalue(fixture)),
        memory={"blocks_to_swap": blocks_to_swap},
    )
    family = get_family(config)
    model = load_model(family, config, dtype=torch.float32, device=CPU)
    return family, model


def _with_lora(family, model):
    """A LoRA on every layer of the attention preset (in every block), dropout on, its B side
    random so that the student differs from the teacher."""
    targets = family.lora_targets(model)["attention"]
    torch.manual_seed(0)
    params = add_lora(model.denoiser, rank=2, alpha=2, dropout=0.25, target_modules=targets)
    with torch.no_grad():
        for param in params[1::2]:
            param.normal_(std=0.1)
    model.denoiser.train()
    return params


def _step(family, model, params, inputs):
    """One step's computations as the trainer makes them: the teacher (no gradients, adapter
    off), the student, a loss between them, its backward. The loss and the LoRA's gradients."""
    torch.manual_seed(1)
    noisy, text = inputs()
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    student = family.predict(model, noisy, t, text)
    loss = (student.float() - teacher.float()).pow(2).mean()
    loss.backward()
    # None: a layer the output does not depend on (Qwen-Image's last text-stream projections)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    for param in params:
        param.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("name", FAMILIES)
def test_block_swap_changes_nothing_training_computes(request, name):
    """Losses and LoRA gradients with 0, 1 and every block swapped are identical (==), with
    gradient checkpointing off and on, with the teacher; per step, N swapped blocks are copied
    3N times: the teacher's forward, the student's forward, its backward (the recomputation)."""
    _, inputs = FAMILIES[name]
    family, model = _load(request, name, 0)
    count = len(family.blocks(model.denoiser))
    results = {}
    for swap in (0, 1, count):
        if swap:
            family, model = _load(request, name, swap)
        params = _with_lora(family, model)
        swapper = getattr(model.denoiser, "block_swapper", None)
        assert (swapper is None) == (swap == 0)
        for checkpointing in (False, True):
            if checkpointing:
                model.denoiser.enable_gradient_checkpointing()
            else:
                model.denoiser.disable_gradient_checkpointing()
            before = swapper.transfers if swapper else 0
            results[swap, checkpointing] = _step(family, model, params, inputs)
            if swapper:
                assert swapper.transfers - before == 3 * swap
    expected_loss, expected_grads = results[0, False]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in expected_grads) > 4
    for (swap, checkpointing), (loss, grads) in results.items():
        assert torch.equal(loss, expected_loss), (swap, checkpointing)
        for grad, expected in zip(grads, expected_grads, strict=True):
            same = grad is expected is None or torch.equal(grad, expected)
            assert same, (swap, checkpointing)


@pytest.mark.parametrize("base_weights", ["fp8", "fp8_scaled"])
def test_block_swap_keeps_the_stored_form_and_changes_nothing(request, base_weights):
    """The CPU copy holds the stored form (float8 here): with every block swapped the teacher,
    the loss and the LoRA's gradients are those of the same stored model without the swap."""
    results = []
    for swap in (0, 2):
        config = ModelConfig(
            family="wan",
            path=str(request.getfixturevalue("tiny_wan")),
            memory={"blocks_to_swap": swap, "base_weights": base_weights},
        )
        family = get_family(config)
        model = load_model(family, config, dtype=torch.bfloat16, device=CPU)
        assert len(family.blocks(model.denoiser)) == 2
        params = _with_lora(family, model)
        model.denoiser.enable_gradient_checkpointing()
        results.append(_step(family, model, params, _wan_inputs))
    (loss, grads), (swapped_loss, swapped_grads) = results
    assert torch.equal(loss, swapped_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, swapped_grads, strict=True))


def test_a_unet_s_convolution_lora_trains_on_swapped_blocks(demo_family, demo_inputs):
    """peft reads a convolution's kernel dimensions from its weight: the placeholders keep
    them. The demo UNet with every block swapped and a LoRA on its convolutions computes what
    it computes without the swap."""
    noisy, timesteps, text = demo_inputs
    outputs = []
    for swap in (False, True):
        model = build_demo_model(seed=0)
        if swap:
            blocks = demo_family.blocks(model.denoiser)
            apply_memory(
                model,
                MemoryConfig(blocks_to_swap=len(blocks)),
                compute_dtype=torch.float32,
                blocks=demo_family.blocks,
            )
        torch.manual_seed(0)
        targets = demo_family.lora_targets(model)["attention_conv"]
        params = add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets)
        with torch.no_grad():
            for param in params[1::2]:
                param.normal_(std=0.1)
        out = demo_family.predict(model, noisy, timesteps, text)
        out.pow(2).mean().backward()
        outputs.append((out.detach(), [p.grad for p in params]))
    (out, grads), (swapped_out, swapped_grads) = outputs
    assert torch.equal(out, swapped_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, swapped_grads, strict=True))


def test_swapped_blocks_hold_no_base_weights_between_uses_and_the_lora_stays(request):
    """Between uses a swapped block's base weights are empty placeholders (so a forward that
    used them before their copy arrived would fail); its LoRA weights stay in place."""
    family, model = _load(request, "wan", 1)
    params = _with_lora(family, model)
    swapped = family.blocks(model.denoiser)[-1]
    resident = family.blocks(model.denoiser)[0]
    lora = {id(p) for p in params}

    def base(block):
        return [p for p in block.parameters() if id(p) not in lora]

    assert base(swapped) and all(p.numel() == 0 for p in base(swapped))
    assert all(p.numel() > 0 for p in base(resident))
    in_swapped = [p for p in swapped.parameters() if id(p) in lora]
    assert in_swapped and all(p.numel() > 0 for p in in_swapped)
    _step(family, model, params, FAMILIES["wan"][1])
    assert all(p.numel() == 0 for p in base(swapped))
    assert all(p.grad is None for p in in_swapped)  # _step took them; they were there
    swapper = model.denoiser.block_swapper
    swapper._arrive = lambda index: None  # the weights never come: the forward cannot run
    with pytest.raises(RuntimeError):
        _step(family, model, params, FAMILIES["wan"][1])


def test_the_forward_keeps_no_swapped_weights_for_the_backward(request):
    """With gradient checkpointing off the swapped blocks still run checkpointed: what the
    student's forward saves for the backward holds none of their weights (they would stay in
    GPU memory until the backward); the backward brings them back."""
    family, model = _load(request, "wan", 1)
    params = _with_lora(family, model)
    model.denoiser.disable_gradient_checkpointing()
    swapper = model.denoiser.block_swapper
    copies = []  # kept alive here, so no other tensor takes their memory
    arrive = swapper._arrive

    def recording(index):
        arrive(index)
        copies.extend(w.slots[w.name] for w in swapper._weights[index])

    swapper._arrive = recording
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().data_ptr())
        return tensor

    noisy, text = _wan_inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = family.predict(model, noisy, torch.tensor([0.3, 0.7]), text)
    weights = {c.untyped_storage().data_ptr() for c in copies if c.numel()}
    assert weights and saved and not weights & set(saved)
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in params)


def test_blocks_to_swap_takes_a_count_up_to_the_block_count(request):
    assert MemoryConfig().blocks_to_swap == 0
    with pytest.raises(ValidationError, match="blocks_to_swap"):
        MemoryConfig(blocks_to_swap="auto")
    with pytest.raises(ValidationError, match="blocks_to_swap"):
        MemoryConfig(blocks_to_swap=-1)
    with pytest.raises(ModelLoadError, match="model.memory.blocks_to_swap: 99 .* 0 \\(off\\)"):
        _load(request, "wan", 99)
