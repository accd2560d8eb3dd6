"""What every command group shares: the loaded base model and the model flags."""

import argparse

from memupdate.memory.adapter import (
    AdapterFamily,
    choose_family,
)
from memupdate.memory.base_model import (
    load_model,
    model_identity,
    resolve_model_dir,
)
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.facts import DEFAULT_MAX_FACTS, load_facts
from memupdate.memory.planning import plan_update


class Base:
    """A loaded base model with what every command needs beside it."""

    def __init__(self, model_arg: str | None):
        self.folder = resolve_model_dir(model_arg)
        self.identity = model_identity(self.folder)
        self.model, self.tokenizer = load_model(self.folder)
        self.pad_id = self.tokenizer.pad_token_id

    def encode_facts(self, facts):
        return encode_facts(facts, self.tokenizer, model_context_length(self.model))

    def encode(self, path: str, max_facts: int):
        return self.encode_facts(load_facts(path, max_facts=max_facts))

    def plan(self, facts, family: AdapterFamily, args):
        """The law's plan for these facts at --target-recall, within --max-rank."""
        return plan_update(
            self.model,
            facts,
            self.pad_id,
            self.identity,
            family,
            args.target_recall,
            max_rank=args.max_rank,
        )

    def family(self, args) -> AdapterFamily:
        layers = "default"
        if args.layers:
            layers = None if args.layers == "all" else parse_ints(args.layers)
        modules = tuple(args.modules.split(",")) if args.modules else None
        return choose_family(
            self.model.config.num_hidden_layers,
            modules,
            layers,
            args.lr,
            args.locality_weight,
            args.norm_weight,
            args.train_until,
        )


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model folder (default: SmolLM2-135M)")
    p.add_argument("--max-facts", type=int, default=DEFAULT_MAX_FACTS)
    p.add_argument("--layers", help="layers to adapt: comma list or 'all' (default: 5/6 depth)")
    p.add_argument("--lr", type=float, help="learning rate (default: the family's)")
    p.add_argument(
        "--train-until",
        type=float,
        help="MemFT trains a token until its p is above this (default: the family's)",
    )
    p.add_argument(
        "--locality-weight",
        type=float,
        help="weight of the KL term (KL to the base on unrelated text; 0: off; "
        "default: the family's)",
    )
    p.add_argument(
        "--norm-weight",
        type=float,
        help="weight of the update's norm on unrelated text's activations (0: off; "
        "default: the family's)",
    )
    p.add_argument(
        "--modules",
        help="projections to adapt, comma list (default: all attention and MLP projections)",
    )


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))
