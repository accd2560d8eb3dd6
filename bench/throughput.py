"""Training throughput: target tokens trained per second, the new step against the old one, on
the same facts, rank and batches, measured in one run in alternating rounds.

- old step: the whole model forward (30 layers, output head at target positions), fp32, backward,
  AdamW step (the trainer before the frozen-prefix change);
- prefix fp32: only the adapted layer and those above it, on cached hidden states;
- prefix bf16: the same under bf16 autocast (only where the CPU computes bf16 in hardware, as the
  trainer chooses: emulated bf16 is far slower than fp32);
- prefix eager: and plain attention instead of SDPA, in the trainer's precision on this CPU;
- packed: and each batch's sequences laid end to end in as few rows as fit, instead of one per
  row padded to the longest (the trainer's step on CPU);
- compiled: and the layers from the adapted one up compiled with torch.compile (the trainer's
  step for large fact sets; the compile itself happens in the warm-up round and is reported).
Every prefix variant but the last two runs one sequence per row, as the trainer did before
packing.

    .venv/bin/python bench/throughput.py [--facts 40] [--rank 8] [--kinds phonebook] [--rounds 3]
"""

import time
from contextlib import nullcontext

import torch
from common import fact_set, kinds, parser, setup

from memupdate.memory.adapter import default_family
from memupdate.memory.frozen_prefix import (
    FrozenPrefix,
    TopLayers,
    eager_attention_on_cpu,
    first_adapted_layer,
    native_bf16,
)
from memupdate.memory.recall import collate, target_logprobs


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    _, load = setup(args)
    model, tok = load()
    family = default_family(model.config.num_hidden_layers)
    from peft import get_peft_model

    peft_model = get_peft_model(model, family.lora_config(args.rank))
    params = [q for q in peft_model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=family.learning_rate)
    kind = kinds(args)[0]
    facts = fact_set(load, kind, args.facts, args.seed)
    batches = [
        list(range(i, min(i + args.batch_size, len(facts))))
        for i in range(0, len(facts), args.batch_size)
    ]
    t0 = time.monotonic()
    prefix = FrozenPrefix(peft_model, facts, first_adapted_layer(family))
    prefix_s = time.monotonic() - t0

    def old_step(indices):
        return target_logprobs(peft_model, collate([facts[i] for i in indices], tok.pad_token_id))

    compiled = TopLayers(peft_model, prefix.first, compiled=True)

    def prefix_step(indices, bf16, top=None, together=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return prefix.target_logprobs(peft_model, indices, top, together)[0].float()

    bf16 = native_bf16()  # the trainer's choice on this CPU
    eager = lambda: eager_attention_on_cpu(peft_model)  # noqa: E731
    # name: (step, what the whole run of steps happens in)
    variants = {
        "old step (full model, fp32)": (old_step, nullcontext),
        "prefix fp32": (lambda b: prefix_step(b, False), nullcontext),
        "prefix bf16": (lambda b: prefix_step(b, True), nullcontext),
        "prefix eager": (lambda b: prefix_step(b, bf16), eager),
        "packed (trainer)": (lambda b: prefix_step(b, bf16, together=True), eager),
        "packed, compiled (trainer)": (
            lambda b: prefix_step(b, bf16, compiled, together=True),
            eager,
        ),
    }
    if not bf16:
        del variants["prefix bf16"]
    warm_up = {}
    seconds = dict.fromkeys(variants, 0.0)
    tokens = dict.fromkeys(variants, 0)
    peft_model.train()
    for rnd in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name, (step, around) in variants.items():
            start = time.monotonic()
            done = 0
            with around():
                for k in range(args.steps):
                    logp = step(batches[k % len(batches)])
                    (-logp.mean()).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    done += logp.numel()
            if rnd > 0:
                seconds[name] += time.monotonic() - start
                tokens[name] += done
            else:
                warm_up[name] = time.monotonic() - start
    print(
        f"{kind}: {len(facts)} facts, ℓ={sum(len(f.target_ids) for f in facts)}, rank "
        f"{args.rank}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps each, "
        f"threads {torch.get_num_threads()}, trainer steps in {'bf16' if bf16 else 'fp32'}; "
        f"prefix cache built once in {prefix_s:.2f} s; "
        f"warm-up round of the compiled step (compiling it) "
        f"{warm_up['packed, compiled (trainer)']:.1f} s"
    )
    base = tokens["old step (full model, fp32)"] / seconds["old step (full model, fp32)"]
    for name in variants:
        rate = tokens[name] / seconds[name]
        print(f"  {name:30s} {rate:8.1f} target tokens/s   ratio to old step {rate / base:.2f}")


if __name__ == "__main__":
    main()
