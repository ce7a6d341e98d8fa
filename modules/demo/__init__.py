"""The demo task: what the built-in demo model learned from and what scores a run on it.

- :mod:`modules.demo.world`: the synthetic world of shapes the demo model was pretrained on.
- :mod:`modules.demo.dataset`: the demo LoRA dataset (the "sks heart", a subject the world never
  shows) written from that world.
- :mod:`modules.demo.data_folder`: the ``demo-data/`` folder the demo presets name, written on
  first use by the CLI and the UI alike.
- :mod:`modules.demo.classifier` and :mod:`modules.demo.subject_judge`: the small judges (shipped
  as float16 safetensors, :mod:`modules.demo.half_weights`) that score the demo model's samples.

The demo *family* (the model itself, behind the same Protocol as the others) is
:mod:`modules.models.demo`. No training code imports this package: a run on your own data never
loads it.
"""
