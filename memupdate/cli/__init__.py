"""`memupdate` command line: prepare the model, plan an update, train an adapter, publish it,
run the service. One module per command group; this one only assembles them."""

import argparse
import sys

from memupdate.cli import memory, service, serving
from memupdate.memory.base_model import ModelError
from memupdate.memory.facts import FactError
from memupdate.memory.law import LawError
from memupdate.service.jobs import JobStoreError
from memupdate.serving.vllm_client import ServingError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memupdate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    memory.add_commands(sub)
    serving.add_commands(sub)
    service.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FactError, LawError, ModelError, ServingError, JobStoreError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
