"""Shared set-up for the benchmarks: the default model and seeded fact sets of three kinds."""

import argparse
import os
import sys
from dataclasses import replace

import torch

from memupdate.memory.base_model import load_model, prepare_default_model, resolve_model_dir
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.fact_sets import KINDS

KIND_NAMES = tuple(KINDS)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--facts", type=int, default=40, help="facts per set")
    p.add_argument("--kinds", default="phonebook", help=f"comma list of {', '.join(KIND_NAMES)}")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=1500)
    return p


def setup(args):
    """(folder, model loader). The loader gives a fresh base model each call."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    folder = (
        resolve_model_dir(args.model)
        if args.model
        else prepare_default_model(progress=lambda m: print(m, file=sys.stderr))
    )
    return folder, (lambda: load_model(folder))


def fact_set(load, kind: str, count: int, seed: int, first: int | None = None):
    """The encoded forms (prompt, chat, ...) of `count` facts of one kind, or of the `first`
    of them."""
    model, tok = load()
    facts = KINDS[kind](count, seed=seed)[:first]
    return encode_facts(facts, tok, model_context_length(model))


def kinds(args) -> list[str]:
    chosen = args.kinds.split(",") if args.kinds != "all" else list(KIND_NAMES)
    unknown = set(chosen) - set(KIND_NAMES)
    if unknown:
        raise SystemExit(f"unknown fact kinds {sorted(unknown)}; choose from {KIND_NAMES}")
    return chosen


def parse_layers(text: str) -> tuple[int, ...]:
    """Layers to adapt as the benchmarks spell them: "25", or "8+20" for two."""
    return tuple(map(int, text.split("+")))


def train(load, facts, rank: int, seed: int, max_steps: int, mode: str = "memft", **settings):
    """One training of a fresh base model with the default family; the TrainResult. Extra
    keyword arguments go to TrainSettings, except `token_weights` and `on_progress` (to
    train_adapter) and `lr` (the family's learning rate)."""
    return train_and_measure(load, facts, rank, seed, max_steps, mode, measure=False, **settings)[0]


def train_and_measure(load, facts, rank, seed, max_steps, mode="memft", measure=True, **settings):
    """(TrainResult, LocalityReport or None, the trained PEFT model): a training as `train`
    does, then, with `measure`, the adapter's locality."""
    from memupdate.memory.adapter import default_family
    from memupdate.memory.locality import measure_locality, retain_set
    from memupdate.memory.memft import TrainSettings, train_adapter

    model, tok = load()
    weights = settings.pop("token_weights", None)
    on_progress = settings.pop("on_progress", None)
    family = settings.pop("family", None) or default_family(model.config.num_hidden_layers)
    if "lr" in settings:
        family = replace(family, learning_rate=settings.pop("lr"))
    config = TrainSettings(
        rank=rank, mode=mode, seed=seed, family=family, max_steps=max_steps, **settings
    )
    retain = retain_set(model, tok, family, seed=seed)
    peft_model, result = train_adapter(
        model, facts, tok.pad_token_id, config, on_progress, token_weights=weights, retain=retain
    )
    return result, measure_locality(peft_model, tok) if measure else None, peft_model
