"""Load the training stack (torch, diffusers) in the background while the window comes up.

The weight-map preview needs ``process_masks`` (torch) and the image and mask readers, the
concept cards' bucket histograms the image and clip readers: several seconds of imports (the
family's latent grid is plain data and needs none). Done on the Tk thread they would freeze the
window at start; here a daemon thread imports them and the preview shows "loading" until
:func:`ready`.

Every import of the training stack from a background thread goes through :func:`load`, one at a
time: transformers and diffusers resolve their classes lazily, and two threads importing them at
once can each see the other's half-initialised module ("cannot import name ...").
"""

from __future__ import annotations

import importlib
import threading

MODULES = ("modules.loss.masked_loss", "modules.data.images", "modules.data.preparation")

_ready = threading.Event()
_lock = threading.Lock()
_import_lock = threading.Lock()
_thread: threading.Thread | None = None
_error: str | None = None


def start() -> None:
    """Start the imports once; later calls do nothing."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_load, name="engine-import", daemon=True)
            _thread.start()


def load(*names: str) -> None:
    """Import ``names`` while no other thread imports the training stack."""
    with _import_lock:
        for name in names:
            importlib.import_module(name)


def _load() -> None:
    global _error
    try:
        load(*MODULES)
    except (ImportError, RuntimeError) as error:
        # diffusers and transformers report a failed lazy import as RuntimeError.
        # Shown in the preview instead of the maps; training would fail the same way.
        _error = f"the training engine could not be loaded: {error}"
        return
    _ready.set()


def ready() -> bool:
    return _ready.is_set()


def error() -> str | None:
    return _error


def wait(timeout: float | None = None) -> bool:
    """Block until loaded (for scripts and tests, never on the Tk thread)."""
    start()
    return _ready.wait(timeout)
