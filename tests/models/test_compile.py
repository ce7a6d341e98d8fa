"""``training.compile``: the denoiser's blocks compiled one by one train with the teacher as the
eager blocks do, every graph is compiled in the first steps, and the teacher stays the base."""

import pytest
import torch
from torch._dynamo.utils import counters

from modules.config import config_from_dict
from modules.config.presets import ConfigError
from modules.lora import add_lora, lora_disabled
from modules.models.compiled import compile_blocks
from modules.models.demo.family import DemoFamily, build_demo_model
from modules.trainer.step import train_step
from tests.trainer.test_step import make_batch, make_parts

STEPS = 5
BACKEND = "aot_eager"
"""The graphs a run compiles, their guards and recompilations, without Inductor's code generation
(a minute of C++ compilation on one CPU core; the Inductor check below generates one graph's
code)."""


def _model():
    """The demo's tiny WAN transformer (6 blocks of one shape) with a LoRA whose up-projections
    are not zero: the student and the teacher differ."""
    family = DemoFamily()
    model = build_demo_model(seed=0, architecture="wan")
    torch.manual_seed(0)
    params = add_lora(
        model.denoiser,
        rank=4,
        alpha=4,
        dropout=0.0,
        target_modules=family.lora_targets(model)["attention"],
    )
    with torch.no_grad():
        for param in params[1::2]:
            param.normal_(std=0.05)
    model.denoiser.train()
    return family, model, params


def _train(model, params, after_step=None):
    """``STEPS`` training steps with the teacher (SGD on the LoRA); the losses."""
    optimizer = torch.optim.SGD(params, lr=0.1)
    parts = make_parts(model)
    losses = []
    for step in range(1, STEPS + 1):
        result = train_step(make_batch(model), parts, prior_weight=1.0)
        assert result.teacher_fraction == 0.5  # two of the four samples need the teacher
        result.loss.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(result.loss.total.detach()))
        if after_step:
            after_step(step)
    return losses


def test_compiled_blocks_train_with_the_teacher_and_stop_compiling_after_the_first_step():
    """Losses as the eager model's (float tolerance); the graph count after step 3 does not
    change (no recompilation: the teacher switch reuses its graph); the teacher, the same
    compiled blocks with the LoRA off, equals the base model's prediction."""
    family, eager, eager_params = _model()
    expected = _train(eager, eager_params)

    torch._dynamo.reset()
    counters.clear()
    family, model, params = _model()
    assert compile_blocks(model.denoiser, family.blocks, backend=BACKEND) == 6
    graphs = {}
    losses = _train(model, params, lambda step: graphs.update({step: _graphs()}))
    assert losses == pytest.approx(expected, rel=1e-4)
    assert losses[0] != losses[-1]  # it trained
    # the teacher, the student's first block, its blocks after: 3 graphs, all in step 1
    assert graphs[1] == 3 and graphs[3] == graphs[STEPS] == 3, graphs

    noisy, t, text = _inputs(model)
    with torch.no_grad():
        with lora_disabled(model.denoiser):
            teacher = family.predict(model, noisy, t, text)
        student = family.predict(model, noisy, t, text)
    base = build_demo_model(seed=0, architecture="wan")
    with torch.no_grad():
        eager_base = family.predict(base, noisy, t, text)
        compile_blocks(base.denoiser, family.blocks, backend=BACKEND)
        compiled_base = family.predict(base, noisy, t, text)
    # Bit for bit the base model compiled the same way; the eager base's rounding differs
    # (the compiled kernels fuse and order their sums their own way).
    assert torch.equal(teacher, compiled_base)
    assert torch.allclose(teacher, eager_base, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(student, teacher, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def _graphs():
    return counters["stats"]["unique_graphs"]


def _inputs(model):
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 48, 8, 8, generator=generator)
    text = DemoFamily().encode_prompts(model, ["a red ball", "a cat"])
    return noisy, torch.tensor([0.3, 0.8]), text


def test_compile_and_block_swap_together_are_refused_naming_both():
    with pytest.raises(ConfigError) as raised:
        config_from_dict(
            {"training": {"compile": True}, "model": {"memory": {"blocks_to_swap": 1}}}
        )
    message = str(raised.value)
    assert "training.compile" in message and "model.memory.blocks_to_swap=0" in message
    config = config_from_dict({"training": {"compile": True}})
    assert config.training.compile is True


def test_the_teacher_under_inductor_is_the_base_model_compiled_the_same_way():
    """What a run compiles with (Inductor): the teacher, the LoRA switched off in the compiled
    blocks, equals the base model's blocks compiled the same way, bit for bit."""
    torch._dynamo.reset()
    counters.clear()
    family, model, _ = _model()
    compile_blocks(model.denoiser, family.blocks)
    base = build_demo_model(seed=0, architecture="wan")
    compile_blocks(base.denoiser, family.blocks)
    noisy, t, text = _inputs(model)
    with torch.no_grad():
        with lora_disabled(model.denoiser):
            teacher = family.predict(model, noisy, t, text)
        compiled_base = family.predict(base, noisy, t, text)
    assert torch.equal(teacher, compiled_base)
    assert _graphs() == 2  # both compiled (Inductor's cache gives the second the same code)
    torch._dynamo.reset()
