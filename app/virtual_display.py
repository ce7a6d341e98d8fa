"""A virtual X display (Xvfb) for running the window without a screen: tests, screenshots and
the latency benchmark. Xvfb picks a free display number itself (``-displayfd``)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess

SCREEN = "1600x1000x24"
START_TIMEOUT_S = 15


class VirtualDisplay:
    def __init__(self, screen: str = SCREEN) -> None:
        self.screen = screen
        self.process: subprocess.Popen[bytes] | None = None
        self.name: str | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("Xvfb") is not None

    def start(self) -> str:
        """Start Xvfb and return its display name, e.g. ``:99``."""
        read_end, write_end = os.pipe()
        self.process = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_end), "-screen", "0", self.screen, "-nolisten", "tcp"],
            pass_fds=(write_end,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            # Xvfb writes the number once it accepts connections; it closes the pipe on failure.
            ready, _, _ = select.select([pipe], [], [], START_TIMEOUT_S)
            number = pipe.readline().strip() if ready else ""
        if not number:
            self.stop()
            raise RuntimeError("Xvfb did not start (no display number reported)")
        self.name = f":{number}"
        return self.name

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
