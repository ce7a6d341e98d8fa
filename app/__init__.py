"""The desktop application (customtkinter). Start it with ``python -m app`` or ``start-ui.sh``.

Nothing here imports torch at module level: the training stack is loaded in background threads
(``app.engine_import`` for the preview, ``app.trainer_thread`` for runs).
"""
