"""What a recall probe through vLLM stores, and whether it is a regression.

Used by the go-live check (a version's first probe) and by the recall monitor.
"""

from memupdate.serving.registry import Version
from memupdate.serving.vllm_client import ServingRecall


def rotating_window(items: list, size: int, turn: int) -> list:
    """The `turn`-th window of `size` items, wrapping around: successive turns cover every item
    (the recall probes' samples, a go-live's facts of an older adapter)."""
    n, size = len(items), min(len(items), size)
    start = turn * size % max(1, n)
    return [items[(start + k) % n] for k in range(size)]


def worst_fact_recall(serving: dict) -> float:
    """The lowest fact recall over the replicas of a go-live check (registry `serving` field)."""
    return min(r["recall"]["fact_recall"] for r in serving.values())


def worst_locality(serving: dict) -> dict | None:
    """The go-live locality of the replica with the lowest token agreement (None for versions
    verified before locality was measured)."""
    measured = [r["locality"] for r in serving.values() if r.get("locality")]
    return min(measured, key=lambda m: m["token_agreement"]) if measured else None


def probe_record(
    version: Version,
    result: ServingRecall,
    source: str,
    max_drop: float,
    prompts: dict[str, str] | None = None,
) -> dict:
    """What a successful probe stores: the recall, and whether (and why) it regressed."""
    rec = result.recall
    target = version.target_fact_recall
    verified = worst_fact_recall(version.serving) if version.serving else None
    reasons = []
    if rec.fact_recall < target:
        reasons.append(f"fact recall {rec.fact_recall:.3f} below the target {target:.3f}")
    if verified is not None and rec.fact_recall < verified - max_drop:
        reasons.append(f"fact recall {rec.fact_recall:.3f} dropped from {verified:.3f} at go-live")
    if result.greedy_exact < result.greedy_checked:
        reasons.append(
            f"greedy output differs from the target for {', '.join(result.greedy_mismatches[:5])}"
        )
    prompts = prompts or {}
    flipped = [
        {"fact": fact, "prompt": prompts.get(fact, "")[:200], "min_probability": p}
        for fact, p in zip(rec.failing, rec.failing_min_probs, strict=True)
    ][:20]
    return {
        "version": version.version,
        "source": source,
        **result.to_dict(),
        "regressed": bool(reasons),
        "reason": "; ".join(reasons),
        "flipped": flipped,
    }
