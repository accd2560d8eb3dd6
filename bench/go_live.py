"""From a trained adapter to served-and-verified, on the default model through a real vLLM.

Prints the time of each phase (train, publish, stage + verify through vLLM, swap to live) and
their ratio to the training time measured in the same run, and how serving recall compares with
the trainer's own teacher-forced figures (largest per-token |Δp|).

    cd bench && ../.venv/bin/python go_live.py
"""

import tempfile
import time
from pathlib import Path

import torch
from common import setup

from memupdate.memory.adapter import default_family
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.facts import load_facts
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import TrainSettings, train_adapter
from memupdate.memory.recall import token_probabilities
from memupdate.serving.backends import ManagedBackend, verify_and_go_live
from memupdate.serving.registry import Registry
from memupdate.serving.vllm_client import serving_recall
from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "new_facts.jsonl"


class Args:
    model = None
    facts = 0
    seed = 0


def main() -> None:
    folder, load = setup(Args)
    model, tok = load()
    facts = load_facts(EXAMPLES)
    encoded = encode_facts(facts, tok, model_context_length(model))
    work = Path(tempfile.mkdtemp(prefix="go-live-"))

    t0 = time.monotonic()
    settings = TrainSettings(rank=4, family=default_family(model.config.num_hidden_layers))
    peft_model, result = train_adapter(
        model, encoded, tok.pad_token_id, settings, retain=retain_set(model, tok, settings.family)
    )
    peft_model.save_pretrained(work / "adapter")
    train_s = time.monotonic() - t0
    hf = torch.cat(token_probabilities(peft_model, encoded, tok.pad_token_id))

    t0 = time.monotonic()
    server = ManagedVLLM(ServerConfig(model=folder, max_lora_rank=8), log_path=work / "vllm.log")
    server.start()
    start_s = time.monotonic() - t0
    try:
        registry = Registry(work / "registry")
        t0 = time.monotonic()
        version = registry.publish("news", work / "adapter", {}, facts=facts)
        publish_s = time.monotonic() - t0
        t0 = time.monotonic()
        live = verify_and_go_live(registry, ManagedBackend(server), version, encoded, tok, 1.0)
        verify_s = time.monotonic() - t0
        served = serving_recall(server.client, "news", encoded, tok)
        vllm_p = torch.tensor(
            [p for probs in server.client.target_probabilities("news", encoded) for p in probs]
        )
    finally:
        server.stop()

    print(
        f"{len(facts)} facts, ℓ={result.sequence_length}, rank 4: trained={result.success} in "
        f"{result.steps} steps"
    )
    print(
        f"phase seconds: train {train_s:.1f}, vLLM start {start_s:.1f} (once per server), "
        f"publish {publish_s:.2f}, stage+verify+swap {verify_s:.1f}; live={live.live}"
    )
    print(f"ratio to training time: trained adapter -> live {(publish_s + verify_s) / train_s:.2f}")
    print(
        f"recall, trainer (HF fp32): fact {result.recall.fact_recall:.3f} token "
        f"{result.recall.token_recall:.3f} lowest p {hf.min():.4f}"
    )
    print(
        f"recall, through vLLM (fp32): fact {served.recall.fact_recall:.3f} token "
        f"{served.recall.token_recall:.3f} lowest p {served.recall.min_prob:.4f}; greedy exact "
        f"{served.greedy_exact}/{served.greedy_checked}; max per-token |Δp| "
        f"{(vllm_p - hf).abs().max():.2e}"
    )


if __name__ == "__main__":
    main()
