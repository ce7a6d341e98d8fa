"""The prior levers' controls on the Prior preservation tab change the config."""

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
