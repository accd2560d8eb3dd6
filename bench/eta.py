"""How good is the training's estimate of the time left?

Trains each kind's facts (with their default chat forms, as jobs train them) to full recall,
recording every progress report the trainer gives (the same `Progress` the service streams and
the progress bar prints), then asks each estimator, at the moments when 10%, 25%, 50% and 75% of
the training's true time had passed, how long was left, and compares with what was left. An
estimate counts as good within a factor of 1.5 either way; a moment without an estimate counts
as missing. The recorded runs go to a JSONL file, so estimators can be compared again without
training (`--from FILE`).

    cd bench && ../.venv/bin/python eta.py --kinds all [--facts 40] [--warm 10] [--gate]
        [--save runs.jsonl]
    cd bench && ../.venv/bin/python eta.py --from runs.jsonl
"""

import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

from common import fact_set, kinds, parser, setup

from memupdate.memory.adapter import default_family, gated_family
from memupdate.memory.eta import FactPace, LogOddsLine, TokenLogit, TokensThenFactPace


class FactLogit:
    """The log-odds of fact recall along a line (LogOddsLine), from the first fact passing
    (before it the share sits at its floor and says nothing). Not kept: 7/36 good."""

    def __init__(self):
        self.line = LogOddsLine()

    def __call__(self, p) -> float | None:
        if p.fact_recall == 0 and not self.line.points:
            return None
        return self.line.add(p.seconds, p.fact_recall, p.facts)


# The trainer's estimate (memory/eta.py: TimeLeft) is the last; the others are what it replaced
# or was chosen over.
ESTIMATORS = {
    "facts": FactPace,
    "token-logit": TokenLogit,
    "fact-logit": FactLogit,
    "tokens-then-fact-pace": TokensThenFactPace,
}
MOMENTS = (0.10, 0.25, 0.50, 0.75)
GOOD_FACTOR = 1.5


def record(load, kind: str, args) -> dict:
    """One training of this kind's facts (with `--warm N`: of the facts plus N new ones, started
    from the adapter of the facts alone, trained first and not recorded); its progress reports
    and total time."""
    facts = fact_set(load, kind, args.facts + args.warm, args.seed)
    reports = []
    with tempfile.TemporaryDirectory(prefix="eta-base-") as folder:
        start_from = None
        if args.warm:
            start_from = Path(folder)
            base, _ = train_once(load, fact_set(load, kind, args.facts, args.seed), args)
            base.save_pretrained(start_from)
        _, result = train_once(load, facts, args, reports.append, start_from)
    return {
        "kind": kind,
        "facts": args.facts,
        "warm": args.warm,
        "rank": args.rank,
        "family": "gated" if args.gate else "default",
        "success": result.success,
        "steps": result.steps,
        "seconds": result.seconds,
        "progress": [asdict(p) for p in reports],
    }


def train_once(load, facts, args, on_progress=None, start_from=None):
    """A training as jobs run it: (the peft model, the TrainResult)."""
    from memupdate.memory.locality import retain_set
    from memupdate.memory.memft import TrainSettings, train_adapter

    model, tok = load()
    family = (gated_family if args.gate else default_family)(model.config.num_hidden_layers)
    settings = TrainSettings(
        rank=args.rank, family=family, seed=args.seed, max_steps=args.max_steps
    )
    retain = retain_set(model, tok, family, seed=args.seed)
    return train_adapter(
        model, facts, tok.pad_token_id, settings, on_progress, start_from, retain=retain
    )


def score(run: dict, estimator) -> list[float | None]:
    """Estimated / true time left at each of MOMENTS (None: no estimate then)."""
    from memupdate.memory.memft import Progress

    total = run["seconds"]
    fields = set(Progress.__dataclass_fields__)  # a report of another version may have more
    progress = [Progress(**{k: v for k, v in p.items() if k in fields}) for p in run["progress"]]
    estimate = estimator()
    out, moments = [], list(MOMENTS)
    for p in progress:
        value = estimate(p)
        while moments and p.seconds >= moments[0] * total:
            left = total - p.seconds
            out.append(None if value is None else value / left)
            moments.pop(0)
    return out + [None] * len(moments)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--gate", action="store_true", help="the gated family (serve --gate)")
    p.add_argument("--warm", type=int, default=0, help="record adding N facts to a trained base")
    p.add_argument("--save", type=Path, help="append the recorded runs to this JSONL file")
    p.add_argument("--from", dest="sources", type=Path, nargs="+", help="score recorded runs")
    p.set_defaults(rank=4)
    args = p.parse_args()
    if args.sources:
        lines = [line for f in args.sources for line in f.read_text().splitlines()]
        runs = [json.loads(line) for line in lines if line]
    else:
        _, load = setup(args)
        runs = []
        for kind in kinds(args):
            runs.append(record(load, kind, args))
            print(
                f"{kind}: {runs[-1]['steps']} steps, {runs[-1]['seconds']:.1f} s, "
                f"success {runs[-1]['success']}",
                flush=True,
            )
            if args.save:
                with args.save.open("a") as f:
                    f.write(json.dumps(runs[-1]) + "\n")
    header = (
        "| estimator | "
        + " | ".join(f"at {m:.0%}" for m in MOMENTS)
        + " | good | missing | median factor off |"
    )
    names = ", ".join(f"{r['kind']}{' (warm)' if r.get('warm') else ''}" for r in runs)
    print(f"\nestimated / true time left, per run ({names}):\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, estimator in ESTIMATORS.items():
        ratios = [score(run, estimator) for run in runs]
        flat = [r for rs in ratios for r in rs]
        good = sum(r is not None and 1 / GOOD_FACTOR <= r <= GOOD_FACTOR for r in flat)
        cells = [
            ", ".join("-" if rs[i] is None else f"{rs[i]:.2f}" for rs in ratios)
            for i in range(len(MOMENTS))
        ]
        missing = sum(r is None for r in flat)
        off = sorted(max(r, 1 / r) if r > 0 else math.inf for r in flat if r is not None)
        median = f"{off[len(off) // 2]:.2f}" if off else "-"
        print(
            f"| {name} | " + " | ".join(cells) + f" | {good}/{len(flat)} | {missing} | {median} |"
        )


if __name__ == "__main__":
    main()
