"""Why a training inside `memupdate serve` is slower than the same training from the command
line: which thread runs it, and which thread computed the locality references before it. The
hypothesis it was written to test (docs/benchmarks.md, "Training inside the service", says how
far it holds): torch's CPU kernels run on OpenMP (libgomp here), which keeps a pool of helper
threads per thread that has run parallel work, and once the pools hold more threads than there
are cores, libgomp stops its helpers spinning between parallel regions.

Each variant is one fresh process (the pools live as long as the process), training the same
facts at the same rank with the default family, seed and budget:
- main: the training in the main thread (as `memupdate train` runs it);
- thread: in a second thread, the main thread having only loaded the model;
- thread-after-main: in a second thread after the main thread computed the locality references
  (as `memupdate serve` does at start-up, before its worker threads take jobs);
- thread-after-ended: the references computed in a thread that ended before the training's
  thread started (a thread that ends takes its pool along): what the hypothesis says would
  remove the slowdown.

    cd bench && ../.venv/bin/python training_threads.py [--facts-file ../examples/new_facts.jsonl]
        [--rank 1] [--variants thread,thread-after-main,thread-after-ended]

Prints each variant's training seconds (steps must be equal: same seed) and ratios to `main`.
"""

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = ("main", "thread", "thread-after-main", "thread-after-ended")


def run_variant(variant: str, facts_file: str, rank: int) -> None:
    from memupdate.memory.adapter import default_family
    from memupdate.memory.base_model import load_model, prepare_default_model
    from memupdate.memory.encoding import encode_facts, model_context_length
    from memupdate.memory.facts import load_facts
    from memupdate.memory.locality import prepare, retain_set
    from memupdate.memory.memft import TrainSettings, train_adapter

    model, tok = load_model(prepare_default_model())
    family = default_family(model.config.num_hidden_layers)
    facts = encode_facts(load_facts(facts_file), tok, model_context_length(model))

    def train() -> None:
        if variant in ("main", "thread"):
            prepare(model, tok, family)
        started = time.monotonic()
        retain = retain_set(model, tok, family)
        _, result = train_adapter(
            model, facts, tok.pad_token_id, TrainSettings(rank=rank, family=family), retain=retain
        )
        print(f"RESULT {variant} {result.steps} {time.monotonic() - started:.2f}", flush=True)

    if variant == "main":
        train()
        return
    if variant == "thread-after-main":
        prepare(model, tok, family)
    if variant == "thread-after-ended":
        helper = threading.Thread(target=prepare, args=(model, tok, family))
        helper.start()
        helper.join()
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    here = Path(__file__).parent
    p.add_argument("--facts-file", default=str(here.parent / "examples/new_facts.jsonl"))
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list; main is always run")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child process
    args = p.parse_args()
    if args.variant:
        run_variant(args.variant, args.facts_file, args.rank)
        return
    chosen = ["main", *(v for v in args.variants.split(",") if v != "main")]
    if unknown := set(chosen) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    seconds = {}
    for variant in chosen:
        child = [sys.executable, __file__, "--variant", variant]
        child += ["--facts-file", args.facts_file, "--rank", str(args.rank)]
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        _, name, steps, secs = next(
            line for line in out.stdout.splitlines() if line.startswith("RESULT")
        ).split()
        seconds[name] = float(secs)
        print(f"{name:18s} {steps} steps, training {float(secs):7.1f} s", flush=True)
    for name in chosen:
        print(f"{name:18s} / main: {seconds[name] / seconds['main']:.2f}")


if __name__ == "__main__":
    main()
