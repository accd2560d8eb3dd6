"""Where `make demo`'s time goes before the serving check, and which training settings shorten it.

The demo's job, outside the service (main thread, nothing else running): the 12 facts of
examples/new_facts.jsonl with their chat questions (24 sequences), the gated family (the one
`memupdate serve --gate` trains), a fresh base model per variant, the same seed. Per variant:
the training (its steps and seconds, the final full-model fp32 check included), then what the
service does after it before publishing: the adapter's locality measurement and the gate.
Ratios are to the first variant, measured in the same run.

Variants: `rank=N` (the law's choice for these facts is 1), `lr=X` (the family's rate),
`bs=N` (sequences per step), joined with `+`: `rank=16+lr=1e-2`. `base` is the family as is.

    cd bench && ../.venv/bin/python demo_training.py --variants base,rank=16,bs=24

Then one training step taken apart, on a fresh rank-1 adapter: the fact sequences of a batch of
16 (all of them in a smaller set) and the locality term's retain sequences, forward and
backward, each alone (median of 8).
"""

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples/new_facts.jsonl"


def parse_variant(text: str) -> dict:
    return {} if text == "base" else dict(part.split("=") for part in text.split("+"))


def step_split(model, tok, family, facts, retain) -> dict[str, float]:
    """Median seconds of a step's fact part and locality part (forward, backward, optimizer)."""
    from peft import get_peft_model

    from memupdate.memory.frozen_prefix import (
        FrozenPrefix,
        TopLayers,
        eager_attention_on_cpu,
        first_adapted_layer,
    )

    peft_model = get_peft_model(model, family.lora_config(1))
    prefix = FrozenPrefix(peft_model, facts, first_adapted_layer(family))
    top = TopLayers(peft_model, prefix.first)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    batch = list(range(min(16, len(facts))))  # a training step's batch (fewer in a small set)
    parts = {
        f"facts ({len(batch)} sequences)": lambda: (
            -prefix.target_logprobs(peft_model, batch, top)[0].mean()
        ),
        "locality term": lambda: retain.loss(peft_model, top)[0],
    }
    out = {}
    peft_model.train()
    try:
        with eager_attention_on_cpu(peft_model):
            for name, loss_of in parts.items():
                seconds = []
                for _ in range(10):
                    started = time.perf_counter()
                    loss_of().backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    seconds.append(time.perf_counter() - started)
                out[name] = statistics.median(seconds[2:])
    finally:
        peft_model.unload()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="base,rank=16,lr=1e-2,rank=16+lr=1e-2,bs=24")
    p.add_argument("--facts-file", default=str(EXAMPLES))
    args = p.parse_args()

    from memupdate.memory.adapter import choose_family
    from memupdate.memory.base_model import load_model, prepare_default_model
    from memupdate.memory.encoding import encode_facts, model_context_length
    from memupdate.memory.facts import load_facts
    from memupdate.memory.frozen_prefix import first_adapted_layer, native_bf16
    from memupdate.memory.gate import Gate, general_prompt_states, retain_states
    from memupdate.memory.locality import measure_locality, retain_set
    from memupdate.memory.locality import prepare as prepare_locality
    from memupdate.memory.memft import TrainSettings, train_adapter

    model, tok = load_model(prepare_default_model())
    gated = choose_family(model.config.num_hidden_layers, None, "default", gated=True)
    facts = encode_facts(load_facts(args.facts_file), tok, model_context_length(model))
    layer = first_adapted_layer(gated)
    # What a service computes at start-up, before any job (Runtime.prepare).
    prepare_locality(model, tok, gated)
    retain_states(model, tok, layer)
    general_prompt_states(model, tok, layer)
    print(
        f"{len(facts)} sequences, bf16 steps: {native_bf16()}, torch threads: "
        f"{torch.get_num_threads()}",
        flush=True,
    )

    rows, first = [], None
    for variant in args.variants.split(","):
        change = parse_variant(variant)
        family = replace(gated, learning_rate=float(change.get("lr", gated.learning_rate)))
        settings = TrainSettings(
            rank=int(change.get("rank", 1)), family=family, batch_size=int(change.get("bs", 16))
        )
        retain = retain_set(model, tok, family)
        started = time.monotonic()
        peft_model, result = train_adapter(model, facts, tok.pad_token_id, settings, retain=retain)
        trained = time.monotonic() - started
        started = time.monotonic()
        locality = measure_locality(peft_model, tok)
        locality_s = time.monotonic() - started
        model = peft_model.unload()
        started = time.monotonic()
        gate = Gate.build(model, tok, facts, layer)
        gate.general_prompts_routed(model, tok)
        gate_s = time.monotonic() - started
        first = first or trained
        rows.append(
            f"| {variant} | {result.success} | {result.steps} | {trained:.1f} s | "
            f"{trained / first:.2f} | {trained / max(1, result.steps):.2f} s | "
            f"{locality_s:.1f} s | "
            f"{gate_s:.1f} s | {result.recall.min_prob:.3f} | {locality.token_agreement:.3f} |"
        )
        print(rows[-1], flush=True)

    print(
        "\n| variant | full recall | steps | training | ratio | per step | locality "
        "measurement | gate | lowest p | locality agreement |"
    )
    print("|---" * 10 + "|")
    print("\n".join(rows))
    print("\none step taken apart (rank 1, median of 8):")
    for name, seconds in step_split(
        model, tok, gated, facts, retain_set(model, tok, gated)
    ).items():
        print(f"- {name}: {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()
