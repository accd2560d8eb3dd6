"""How far do target-token probabilities move when the trained adapter is served in another
dtype? This sizes MemFT's stopping margin above 0.5.

Trains with margin 0 (stop as soon as every token passes 0.5) in fp32, then measures the same
teacher-forced probabilities in bfloat16 and reports the largest shift and the tokens that
cross 0.5.

    .venv/bin/python bench/margin_drift.py [--facts 40] [--rank 8]
"""

import torch
from common import fact_set, kinds, parser, setup

from memupdate.memory.adapter import default_family
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import TrainSettings, train_adapter
from memupdate.memory.recall import PASS_PROBABILITY, token_probabilities


def main() -> None:
    args = parser(__doc__).parse_args()
    _, load = setup(args)
    facts = fact_set(load, kinds(args)[0], args.facts, args.seed)
    model, tok = load()
    settings = TrainSettings(
        rank=args.rank,
        margin=0.0,
        seed=args.seed,
        family=default_family(model.config.num_hidden_layers),
        max_steps=args.max_steps,
    )
    peft_model, res = train_adapter(
        model, facts, tok.pad_token_id, settings, retain=retain_set(model, tok, settings.family)
    )
    fp32 = torch.cat(token_probabilities(peft_model, facts, tok.pad_token_id))
    bf16 = torch.cat(token_probabilities(peft_model.to(torch.bfloat16), facts, tok.pad_token_id))
    shift = (bf16.float() - fp32).abs()
    flipped = int(((fp32 > PASS_PROBABILITY) != (bf16.float() > PASS_PROBABILITY)).sum())
    print(
        f"trained to p > 0.5 in fp32: success={res.success} steps={res.steps} "
        f"min_p={fp32.min():.4f}"
    )
    print(
        f"bf16 vs fp32 over {fp32.numel()} target tokens: max |Δp| {shift.max():.4f}, "
        f"p99 {shift.quantile(0.99):.4f}, median {shift.median():.4f}; "
        f"tokens crossing 0.5: {flipped}"
    )


if __name__ == "__main__":
    main()
