"""Where memupdate keeps its state: `$MEMUPDATE_HOME`, default `~/.cache/memupdate`."""

import os
from pathlib import Path


def home() -> Path:
    root = os.environ.get("MEMUPDATE_HOME") or Path.home() / ".cache" / "memupdate"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
