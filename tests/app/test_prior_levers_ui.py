"""The prior levers' controls change the config: the schedule and noise range on the Prior
preservation tab, the prior concept's share and loss weight on the Concepts tab."""

from tests.app.driving import settle


def test_the_schedule_and_noise_range_controls_change_the_config(window):
    window.form.row("prior.schedule").set("warmup")
    window.form.row("prior.schedule_share").set(0.4)
    window.form.row("prior.noise_min").set(0.5)
    settle(window)
    prior = window.form.validation.config.prior
    assert (prior.schedule, prior.schedule_share, prior.noise_min) == ("warmup", 0.4, 0.5)
    assert prior.gated


def test_an_empty_noise_range_marks_its_field_and_blocks_start(window):
    window.form.row("prior.noise_min").set(0.6)
    window.form.row("prior.noise_max").set(0.4)
    settle(window)
    assert "noise range 0.6-0.4 is empty" in window.form.row("prior.noise_min").message
    assert window.run_panel.start_button.cget("state") == "disabled"
    window.form.row("prior.noise_max").set(1.0)
    settle(window)
    assert window.form.row("prior.noise_min").message is None
    assert window.run_panel.start_button.cget("state") == "normal"


def test_the_prior_concepts_share_and_loss_weight_controls_change_the_config(window):
    """The prior-prediction concept's share of the draws is its repeats (items x repeats over
    all); its loss weight multiplies its loss. Both are controls of its row on the Concepts tab."""
    window.choose_preset("demo-prior-prediction (built-in)")
    settle(window)
    concepts = window.form.validation.config.data.concepts
    index = next(i for i, c in enumerate(concepts) if c.type == "prior_prediction")
    window.form.row(f"data.concepts.{index}.repeats").set(2)
    window.form.row(f"data.concepts.{index}.loss_weight").set(3.0)
    settle(window)
    prior = window.form.validation.config.data.concepts[index]
    assert (prior.type, prior.repeats, prior.loss_weight) == ("prior_prediction", 2, 3.0)
    assert window.form.validation.config.data.concepts[1 - index].repeats == 1
