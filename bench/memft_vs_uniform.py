"""MemFT against uniform cross-entropy on the same phonebook facts, rank and seed, in one run.

Prints steps, tokens processed and wall time to 100% fact recall for each, and MemFT/uniform
ratios (timings on these shared machines are only comparable within one run).

    .venv/bin/python bench/memft_vs_uniform.py [--facts 40] [--rank 8]
"""

from common import parser, setup, train


def main() -> None:
    args = parser(__doc__).parse_args()
    _, load, facts = setup(args)
    results = {}
    for mode in ("uniform", "memft"):
        res = train(load, facts, args.rank, args.seed, args.max_steps, mode)
        results[mode] = res
        print(
            f"{mode:8s} success={res.success} steps={res.steps} tokens={res.tokens_processed} "
            f"seconds={res.seconds:.1f} fact_recall={res.recall.fact_recall:.3f} "
            f"token_recall={res.recall.token_recall:.3f} min_p={res.recall.min_prob:.3f}",
            flush=True,
        )
    m, u = results["memft"], results["uniform"]
    ell = m.sequence_length
    print(f"facts={len(facts)} ℓ={ell} rank={args.rank} seed={args.seed}")
    if not (m.success and u.success):
        print("ratios not comparable: a run did not reach 100% fact recall within the budget")
        return
    print(
        f"MemFT/uniform ratios: steps {m.steps / u.steps:.2f}, "
        f"tokens {m.tokens_processed / u.tokens_processed:.2f}, "
        f"wall time {m.seconds / u.seconds:.2f}"
    )


if __name__ == "__main__":
    main()
