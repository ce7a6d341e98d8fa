"""WAN 2.2 A14B with ``model.wan.expert=both``: one LoRA per expert in one run. Every sample of
a step goes to the expert its timestep belongs to (t >= boundary: high_noise), its teacher is
that expert with the LoRA off, only that expert's LoRA and optimizer state change, both files
are written in either layout and load with diffusers' WAN loader, and a resume gives the LoRAs
of the run trained straight through."""

import json
import queue
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.loaders import WanLoraLoaderMixin
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from modules.config import config_from_dict
from modules.lora import lora_state_dict
from modules.models.base import select_text
from modules.models.folder_check import model_folder_problem
from modules.models.wan import WanOptions
from modules.models.wan.family import WanFamily
from modules.trainer import GenericTrainer

pytestmark = pytest.mark.slow

BOUNDARY = 0.875  # the tiny A14B folder's boundary_ratio
EXPERTS = ("high_noise", "low_noise")


def make_config(model_path, concept, tmp_path, **sections):
    data = {
        "model": {"family": "wan", "path": str(model_path), "wan": {"expert": "both"}},
        "data": {
            "concepts": [{"path": str(concept)}],
            "resolution": 32,
            "frames": 5,
            "cache_dir": str(tmp_path / "cache"),
        },
        "mask": {"enabled": True, "normalize_per_sample": True},
        "prior": {"weight": 1.0},
        "lora": {"rank": 4, "alpha": 4, "targets": "attention"},
        "training": {"steps": 8, "learning_rate": 1e-2, "seed": 3},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def lora_of(denoiser):
    return {key: value.clone() for key, value in lora_state_dict(denoiser).items()}


def updates(lora):
    """Each layer's update B @ A of a diffusers-layout LoRA (a start from a file refactors it)."""
    names = [key.removesuffix(".lora_A.weight") for key in lora if key.endswith(".lora_A.weight")]
    return {
        n: lora[f"{n}.lora_B.weight"].float() @ lora[f"{n}.lora_A.weight"].float() for n in names
    }


def copied(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def adapters_on(denoiser) -> bool:
    layer = next(m for m in denoiser.modules() if isinstance(m, BaseTunerLayer))
    return not layer.disable_adapters


@pytest.mark.parametrize(
    ("folder", "concept", "optimizer"),
    [
        ("tiny_wan_a14b", "video_concept", "adamw"),  # text-to-video A14B
        ("tiny_wan_i2v22", "clip_concept", "adamw8bit"),  # image-to-video A14B (boundary 0.9)
    ],
)
def test_each_step_trains_the_expert_its_timesteps_belong_to_and_only_it(
    folder, concept, optimizer, tmp_path, request
):
    """One optimizer over both LoRAs: the expert not trained at a step gets no gradient, so
    neither its weights nor its optimizer state change (weight decay on)."""
    training = {"optimizer": optimizer, "weight_decay": 0.1, "steps": 8}
    sampling = {"prompts": ["a photo of sks heart"], "every": 0, "steps": 4}
    model_path, data = request.getfixturevalue(folder), request.getfixturevalue(concept)
    config = make_config(model_path, data, tmp_path, training=training, sampling=sampling)
    trainer = GenericTrainer(config)
    trainer.setup()
    boundary = trainer.built.family.boundary
    assert boundary == json.loads((model_path / "model_index.json").read_text())["boundary_ratio"]
    experts = trainer.built.model.experts.denoisers
    assert list(experts) == list(EXPERTS) and experts["high_noise"] is trainer.built.denoiser
    calls = []  # (expert, timesteps x 1000, grad on, its LoRA on, the other's on, train mode)
    for name, denoiser in experts.items():
        other = experts[EXPERTS[1 - EXPERTS.index(name)]]

        def hook(_module, _args, kwargs, name=name, denoiser=denoiser, other=other):
            calls.append(
                (
                    name,
                    kwargs["timestep"].detach().clone(),
                    torch.is_grad_enabled(),
                    adapters_on(denoiser),
                    adapters_on(other),
                    denoiser.training,
                )
            )

        denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    optimizer = trainer.built.optimizer
    params = {name: [p for p in d.parameters() if p.requires_grad] for name, d in experts.items()}
    trained = []
    for _ in range(trainer.config.training.steps):
        before = {name: lora_of(denoiser) for name, denoiser in experts.items()}
        states = {
            name: [{k: copied(v) for k, v in optimizer.state[p].items()} for p in ps]
            for name, ps in params.items()
        }
        calls.clear()
        result = trainer.optimizer_step()
        trained.append(result.expert)
        idle = EXPERTS[1 - EXPERTS.index(result.expert)]
        # Every forward of the step (teacher and student) went to the step's expert, and its
        # timesteps lie on that expert's side of the boundary.
        assert calls and {call[0] for call in calls} == {result.expert}
        for _, timesteps, grad, own_on, other_on, _ in calls:
            assert bool((timesteps >= boundary * 1000).all()) == (result.expert == "high_noise")
            assert bool((timesteps < boundary * 1000).all()) == (result.expert == "low_noise")
            # The teacher (no grad) is the expert with its LoRA off; the student has it on.
            assert own_on == grad and other_on == grad
        assert any(not call[2] for call in calls)  # the teacher ran
        after = {name: lora_of(denoiser) for name, denoiser in experts.items()}
        changed = before[result.expert]
        assert any(not torch.equal(changed[k], after[result.expert][k]) for k in changed)
        assert all(torch.equal(before[idle][k], v) for k, v in after[idle].items())
        assert all(p.grad is None for p in params[idle])
        for earlier, p in zip(states[idle], params[idle], strict=True):
            now = optimizer.state[p]
            assert earlier.keys() == now.keys()
            assert all(same(earlier[k], now[k]) for k in earlier)
    assert set(trained) == set(EXPERTS)  # enough steps that both experts trained
    # Samples: each expert, in eval mode, with its LoRA on its own side of the boundary; the
    # base samples with neither LoRA.
    calls.clear()
    trainer.built.samples.write(trainer.step)
    assert {call[0] for call in calls} == set(EXPERTS)
    for name, timesteps, _, own_on, other_on, train_mode in calls:
        assert bool((timesteps >= boundary * 1000).all()) == (name == "high_noise")
        assert own_on == other_on and not train_mode
    assert {call[3] for call in calls} == {True, False}  # with the LoRAs, and the base


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_both_files_are_written_at_each_save_and_load_with_diffusers(
    tiny_wan_a14b, video_concept, tmp_path, layout
):
    config = make_config(
        tiny_wan_a14b,
        video_concept,
        tmp_path,
        training={"steps": 2, "seed": 1},  # a seed whose two steps train both experts
        output={"run_dir": str(tmp_path / "run"), "format": layout, "save_every": 1},
    )
    trainer = GenericTrainer(config)
    finished = trainer.run()
    assert finished.error is None, finished.error
    run = tmp_path / "run"
    names = sorted(p.name for p in run.glob("*.safetensors"))
    assert names == sorted(
        f"lora{step}-{expert}.safetensors"
        for step in ("", "-step000001", "-step000002")
        for expert in EXPERTS
    )
    assert finished.lora_path == run / "lora-high_noise.safetensors"
    experts = trainer.built.model.experts.denoisers
    for expert, denoiser in experts.items():
        expected = lora_state_dict(denoiser)
        loaded = WanLoraLoaderMixin.lora_state_dict(str(run / f"lora-{expert}.safetensors"))
        assert loaded.keys() == expected.keys()
        assert all(torch.allclose(loaded[k].float(), v, atol=1e-6) for k, v in expected.items())
    high, low = (load_file(run / f"lora-{expert}.safetensors") for expert in EXPERTS)
    assert high.keys() == low.keys()
    assert any(not torch.equal(high[k], low[k]) for k in high)  # two LoRAs, not one twice
    if layout == "comfyui":
        return
    # lora.init_from names either file of the pair: each expert starts from its own.
    again = make_config(
        tiny_wan_a14b,
        video_concept,
        tmp_path,
        lora={"init_from": str(run / "lora-low_noise.safetensors")},
        output={"run_dir": str(tmp_path / "again")},
    )
    started = GenericTrainer(again)
    started.setup()
    for expert, denoiser in started.built.model.experts.denoisers.items():
        saved = updates(load_file(run / f"lora-{expert}.safetensors"))
        assert any(bool(update.abs().amax() > 0) for update in saved.values()), expert
        now = updates(lora_state_dict(denoiser))
        assert saved.keys() == now.keys()
        assert all(torch.allclose(now[k], v, atol=1e-5) for k, v in saved.items()), expert


def test_a_resumed_run_gives_both_loras_of_the_run_trained_straight(
    tiny_wan_a14b, video_concept, tmp_path
):
    def config(run_dir, steps):
        return make_config(
            tiny_wan_a14b,
            video_concept,
            tmp_path,
            training={"steps": steps, "seed": 1},  # both experts before and after step 3
            output={"run_dir": str(run_dir), "backup_every": 3, "backup_keep": 1},
            mask={"unmasked_probability": 0.5},
        )

    straight = GenericTrainer(config(tmp_path / "straight", 6)).run()
    assert straight.error is None, straight.error
    stopped = GenericTrainer(config(tmp_path / "stopped", 3)).run()  # its backup of step 3
    assert stopped.error is None, stopped.error
    resumed = GenericTrainer(config(tmp_path / "stopped", 6), resume="latest").run()
    assert resumed.error is None, resumed.error
    for expert in EXPERTS:
        expected = load_file(tmp_path / "straight" / f"lora-{expert}.safetensors")
        found = load_file(tmp_path / "stopped" / f"lora-{expert}.safetensors")
        assert expected.keys() == found.keys()
        assert all(torch.equal(found[k], v) for k, v in expected.items()), expert
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("straight", "stopped")
    ]
    experts = [[row["expert"] for row in run] for run in rows]
    assert experts[0] == experts[1]
    # Both experts trained before the backup and after it: the backup held both LoRAs and
    # their optimizer state, and the resumed steps went on with each.
    assert set(experts[0][:3]) == set(experts[0][3:]) == set(EXPERTS), experts[0]
    assert [r["loss_total"] for r in rows[0]] == [r["loss_total"] for r in rows[1]]
    for row in rows[0]:
        assert row[f"loss_total_{row['expert']}"] == row["loss_total"]


def test_both_is_refused_for_a_one_transformer_folder(tiny_wan):
    problem = model_folder_problem("wan", str(tiny_wan), WanOptions(expert="both"))
    assert "model.wan.expert=both" in problem and "one transformer" in problem


def test_a_one_file_init_from_is_refused_by_name(tiny_wan_a14b, video_concept, tmp_path):
    lone = tmp_path / "lone.safetensors"  # a LoRA file, but not one of an expert pair
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24)}, lone)
    config = make_config(tiny_wan_a14b, video_concept, tmp_path, lora={"init_from": str(lone)})
    events: queue.Queue = queue.Queue()
    finished = GenericTrainer(config, events).run()
    assert finished.error is not None and "lora.init_from" in finished.error
    assert "-high_noise.safetensors" in finished.error


def test_a_batch_from_both_sides_of_the_boundary_is_split_between_the_experts(tiny_wan_a14b):
    """The drift meter's batches mix noise levels: each sample still goes to its expert."""
    family = WanFamily(WanOptions(expert="both"))
    model = family.load(str(tiny_wan_a14b), dtype=torch.float32, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(3, 16, 2, 4, 4, generator=generator)  # (B, C, F', h, w)
    timesteps = torch.tensor([0.95, 0.3, BOUNDARY])
    text = {"embeds": torch.randn(3, 5, 32, generator=generator)}
    with torch.no_grad():
        mixed = family.predict(model, noisy, timesteps, text)
        for name, rows in (("high_noise", [0, 2]), ("low_noise", [1])):
            alone = replace(model, denoiser=model.experts.denoisers[name], experts=None)
            expected = family.predict(alone, noisy[rows], timesteps[rows], select_text(text, rows))
            assert torch.allclose(mixed[rows], expected, atol=1e-6), name
        other = replace(model, denoiser=model.experts.denoisers["low_noise"], experts=None)
        wrong = family.predict(other, noisy[[0]], timesteps[[0]], select_text(text, [0]))
    assert not torch.allclose(mixed[[0]], wrong, atol=1e-3)  # two different experts


def test_the_steps_timesteps_together_follow_wan_s_whole_distribution(tiny_wan_a14b):
    """Each step draws its expert with its side's share, then its timesteps on that side: over
    many steps, the timesteps are those of one model trained on the whole range."""
    family = WanFamily(WanOptions(expert="both"))
    model = family.load(str(tiny_wan_a14b), dtype=torch.float32, device=torch.device("cpu"))
    generator, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    drawn, experts = [], []
    for _ in range(4000):
        experts.append(model.experts.draw(generator))
        drawn.append(family.sample_timesteps(torch.Size([2]), generator=generator, device=cpu))
    drawn = torch.stack(drawn)  # (steps, 2)
    high = torch.tensor([expert == "high_noise" for expert in experts])
    assert bool((drawn[high] >= BOUNDARY).all()) and bool((drawn[~high] < BOUNDARY).all())
    whole = WanFamily(WanOptions())  # one transformer's draws: the whole shifted range
    reference = whole.sample_timesteps(torch.Size([8000]), generator=generator, device=cpu)
    levels = torch.linspace(0.05, 0.95, 19)
    assert torch.allclose(drawn.flatten().quantile(levels), reference.quantile(levels), atol=0.02)
    share = float(high.float().mean())  # flow shift 3, boundary 0.875: 0.3 of the steps
    assert abs(share - float((reference >= BOUNDARY).float().mean())) < 0.03


def test_the_end_of_run_line_names_both_experts_files() -> None:
    from modules.trainer.events import saved_lora_text

    high = Path("run") / "lora-high_noise.safetensors"
    low = Path("run") / "lora-low_noise.safetensors"
    assert saved_lora_text(high) == f"{high} and {low}"
    assert saved_lora_text(Path("run") / "lora.safetensors") == str(Path("run/lora.safetensors"))
    assert "nothing" in saved_lora_text(None)
