"""Checkpoint and resume a Tessera job in a few lines (Python standard library only).

    from tessera.checkpoint import Checkpointer

    ckpt = Checkpointer()
    state = ckpt.load_json() or {"step": 0}          # the last checkpoint, if any
    while state["step"] < 10_000:
        train_one_step()
        state["step"] += 1
        if ckpt.due():                                # the interval passed, or Tessera asks
            ckpt.save_json(state)                     # (exits after saving when asked to stop)

For large state, `ckpt.save(lambda d: torch.save(model.state_dict(), d / "model.pt"))` writes
anything into the checkpoint directory, and `ckpt.resume_dir` is where the last one was restored.

Tessera sets TESSERA_CHECKPOINT_DIR (write the checkpoint here), TESSERA_RESUME_FROM (the last
complete checkpoint, on a restart), TESSERA_CHECKPOINT_INTERVAL (seconds, when the job declared an
interval) and TESSERA_CHECKPOINT_SIGNAL (sent when the job must stop: save, then exit). A
checkpoint counts once the file COMPLETE is written, last; a half-written one is never used.
Outside Tessera (no TESSERA_CHECKPOINT_DIR) every call is a no-op.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

MARKER = "COMPLETE"


class Checkpointer:
    def __init__(self) -> None:
        d = os.environ.get("TESSERA_CHECKPOINT_DIR")
        self.dir: Optional[Path] = Path(d) if d else None
        r = os.environ.get("TESSERA_RESUME_FROM")
        self.resume_dir: Optional[Path] = Path(r) if r and (Path(r) / MARKER).exists() else None
        self.interval = float(os.environ.get("TESSERA_CHECKPOINT_INTERVAL", "0") or 0)
        self.stop_requested = False
        self._last = time.monotonic()
        name = os.environ.get("TESSERA_CHECKPOINT_SIGNAL")
        if self.dir is not None and name:
            signal.signal(getattr(signal, "SIG" + name), self._on_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.stop_requested = True

    def due(self) -> bool:
        """Whether to save now: Tessera asked (the job is being stopped) or the interval passed."""
        if self.dir is None:
            return False
        return self.stop_requested or (
            self.interval > 0 and time.monotonic() - self._last >= self.interval
        )

    def save(self, write: Callable[[Path], Any]) -> None:
        """Writes a checkpoint with `write(directory)`, marks it complete, and exits when the job
        is being stopped."""
        if self.dir is None:
            return
        marker = self.dir / MARKER
        if marker.exists():
            marker.unlink()  # the previous checkpoint is being replaced: not complete any more
        write(self.dir)
        for root, _, files in os.walk(self.dir):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        with open(marker, "w") as f:
            f.write(str(time.time()))
            f.flush()
            os.fsync(f.fileno())
        self._last = time.monotonic()
        if self.stop_requested:
            sys.exit(0)

    def save_json(self, state: Any, name: str = "state.json") -> None:
        self.save(lambda d: (d / name).write_text(json.dumps(state)))

    def load_json(self, name: str = "state.json") -> Any:
        """The state saved by `save_json` in the last checkpoint, or None on a first start."""
        if self.resume_dir is None:
            return None
        return json.loads((self.resume_dir / name).read_text())
