"""Shared set-up for the benchmarks: the default model and seeded phonebook facts."""

import argparse
import os
import sys

import torch

from memupdate.memory.base_model import load_model, prepare_default_model, resolve_model_dir
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.phonebook import phonebook_facts


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--facts", type=int, default=40, help="phonebook facts")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=1500)
    return p


def setup(args):
    """(folder, model loader, encoded facts). The loader gives a fresh base model each call."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    folder = (
        resolve_model_dir(args.model)
        if args.model
        else prepare_default_model(progress=lambda m: print(m, file=sys.stderr))
    )
    model, tok = load_model(folder)
    facts = encode_facts(
        phonebook_facts(args.facts, seed=args.seed), tok, model_context_length(model)
    )
    return folder, (lambda: load_model(folder)), facts


def train(load, facts, rank: int, seed: int, max_steps: int, mode: str = "memft"):
    """One training of a fresh base model with the default family; the TrainResult."""
    from memupdate.memory.adapter import default_family
    from memupdate.memory.memft import TrainSettings, train_adapter

    model, tok = load()
    family = default_family(model.config.num_hidden_layers)
    settings = TrainSettings(rank=rank, mode=mode, seed=seed, family=family, max_steps=max_steps)
    return train_adapter(model, facts, tok.pad_token_id, settings)[1]
