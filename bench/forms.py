"""Chat-form and paraphrased recall: which forms of a fact are recalled after training, and at
what cost.

Per fact kind (40 facts each by default), one training per variant on a fresh base model:
- `prompt-only`: the prompt form alone (what memupdate trained before chat forms; the baseline
  of the time ratio);
- `default-chat`: the prompt and the chat form made from it (the prompt as the user turn), what a
  fact posted without questions gets;
- `all-forms`: the prompt, two paraphrases and two chat questions per fact (fact_sets.FORMS);
- `more-forms` (phone numbers only): those and four more of each (MORE_PHONEBOOK_FORMS).
Every adapter is measured teacher-forced (p > 0.5 on every target token = greedy-exact) on the
trained forms, and on held-out paraphrases and questions worded differently, never trained.
With `--serve`, the adapters of the `all-forms` variant (or the one `--serve-variant` names) are
also loaded into one vLLM and every trained and held-out question is asked through
/v1/chat/completions (greedy): trained questions must come back exactly; a held-out answer counts
when it contains the target. With `--gate` as well, each adapter is saved with its prompt gate
(memory/gate.py) and asked twice: under a versioned name (`KIND@v1`, never gated) and under the
plain name (gated by memupdate's vLLM plugin); for both, the 48 locality prompts' 16-token greedy
answers are compared with the base model's.

A variant may change the training: `all-forms:margin=0.4` (train until every target token has
p > 0.9), `all-forms:locality=0` (no KL term), `all-forms:norm=300` (the update's norm term),
`all-forms:rank=16`, `all-forms:layers=10`
(adapt layer 10 instead of the family's; `layers=8+20` for two), `all-forms:lr=5e-3` (the
family's learning rate), `all-forms:until=0.95` (MemFT trains a token until p > 0.95).

    cd bench && ../.venv/bin/python forms.py --kinds all --serve

The adapters go to a temporary folder (printed); `--serve-only DIR` asks through vLLM again with
the adapters saved there, without training.
"""

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import kinds, parse_layers, parser, setup, train_and_measure

from memupdate.memory.adapter import default_family
from memupdate.memory.encoding import encode_facts, model_context_length
from memupdate.memory.fact_sets import KINDS
from memupdate.memory.frozen_prefix import first_adapted_layer
from memupdate.memory.gate import Gate
from memupdate.memory.recall import measure_recall

VARIANTS = ("prompt-only", "default-chat", "all-forms", "more-forms")
# `more-forms` (phone numbers only): the `all-forms` set and these wordings besides, 9 paraphrases
# and questions per fact in all. Is a wider spread of trained wordings what carries random digits
# to the held-out ones? None of these is a held-out wording (fact_sets.FORMS).
MORE_PHONEBOOK_FORMS = (
    ["{x} can be reached at", "Phone of {x}:", "You can ring {x} on", "{x}'s telephone number is"],
    [
        "What number do I dial to reach {x}?",
        "Do you have {x}'s number?",
        "What's the telephone number for {x}?",
        "I need to phone {x}. Which number should I use?",
    ],
)


def encoded_sets(tok, context: int, kind: str, count: int, seed: int) -> dict:
    """Training sets per variant, and the two measurement sets (trained forms, held out)."""
    plain = KINDS[kind](count, seed=seed)
    trained = KINDS[kind](count, seed=seed, forms="trained")
    held = KINDS[kind](count, seed=seed, forms="held_out")
    everything = encode_facts(trained, tok, context)
    more = []
    if kind == "phonebook":
        extra_paraphrases, extra_questions = MORE_PHONEBOOK_FORMS
        more = [
            fact.model_copy(
                update={
                    "paraphrases": fact.paraphrases
                    + tuple(t.format(x=x) for t in extra_paraphrases),
                    "questions": fact.questions + tuple(t.format(x=x) for t in extra_questions),
                }
            )
            for fact in trained
            for x in [fact.prompt.removeprefix("The phone number of ").removesuffix(" is")]
        ]
    return {
        "more-forms": encode_facts(more, tok, context),
        "prompt-only": encode_facts(plain, tok, context, chat=False),
        "default-chat": encode_facts(plain, tok, context),
        "all-forms": everything,
        "measure-trained": everything,
        # the held-out set's prompt form is the trained prompt: leave it out
        "measure-held-out": [f for f in encode_facts(held, tok, context) if f.form != "prompt"],
    }


def by_form(model, facts, pad_id: int) -> dict[str, float]:
    return {k: v["fact_recall"] for k, v in measure_recall(model, facts, pad_id).forms.items()}


def chat_questions(tok, sets: dict) -> dict[str, list]:
    """(question, answer, must be exact) for the trained and the held-out chat forms."""

    def of(name: str, exact: bool) -> list:
        return [
            (f.asked, tok.decode(list(f.target_ids), skip_special_tokens=True), exact)
            for f in sets[name]
            if f.form == "chat"
        ]

    return {"trained": of("measure-trained", True), "held-out": of("measure-held-out", False)}


def serve_check(
    folder, adapters: dict[str, Path], questions: dict[str, list], work: Path, gate: bool
):
    """Ask each kind's adapter every question through vLLM's chat endpoint; per kind and served
    name (trained questions answered exactly, held-out questions whose answer contains the
    target; with `gate`, also the locality prompts answered as the base model answers them)."""
    from memupdate.memory.locality import GREEDY_TOKENS, locality_prompts
    from memupdate.serving.vllm_server import ManagedVLLM, ServerConfig

    def answer(name: str, prompt: str) -> str:
        return client.complete(name, prompt, GREEDY_TOKENS)["choices"][0]["text"]

    server = ManagedVLLM(ServerConfig(model=folder, max_lora_rank=16), log_path=work / "vllm.log")
    server.start()
    try:
        client = server.client
        base = {p: answer("base", p) for p in locality_prompts()} if gate else {}
        out = {}
        for kind, path in adapters.items():
            for name in (f"{kind}@v1", kind) if gate else (kind,):
                client.load_adapter(name, str(path))
                scores = {}
                for group, items in questions[kind].items():
                    hits = 0
                    for question, target, exact in items:
                        reply = client.chat(name, question, 48)["choices"][0]["message"]["content"]
                        hits += (reply == target) if exact else (target in (reply or ""))
                    scores[group] = (hits, len(items))
                if gate:
                    same = sum(answer(name, p) == a for p, a in base.items())
                    scores["general prompts unchanged"] = (same, len(base))
                out[name] = scores
                client.unload_adapter(name)
        return out
    finally:
        server.stop()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--serve", action="store_true", help="also ask through vLLM's chat endpoint")
    p.add_argument("--serve-only", type=Path, help="only ask with the adapters saved in DIR")
    p.add_argument("--gate", action="store_true", help="with --serve: also ask through the gate")
    p.add_argument("--serve-variant", default="all-forms", help="with --serve: whose adapter")
    args = p.parse_args()
    folder, load = setup(args)
    model, tok = load()
    context = model_context_length(model)
    work = args.serve_only or Path(tempfile.mkdtemp(prefix="forms-"))
    print(f"adapters and the vLLM log in {work}", flush=True)
    adapters, questions = {}, {}
    header = (
        "| kind | variant | sequences | ℓ | time ratio | trained forms (prompt / paraphrase / "
        "chat) | held-out (paraphrase / chat) | locality agreement | prompts unchanged |"
    )
    rows = []
    for kind in kinds(args):
        sets = encoded_sets(tok, context, kind, args.facts, args.seed)
        baseline = None
        if args.serve_only:
            adapters[kind] = work / kind
            questions[kind] = chat_questions(tok, sets)
        for variant in [] if args.serve_only else args.variants.split(","):
            name, *changes = variant.split(":")
            change = dict(c.split("=") for c in changes)
            settings = {"margin": float(change["margin"])} if "margin" in change else {}
            if "until" in change:
                settings["train_until"] = float(change["until"])
            family = default_family(model.config.num_hidden_layers)
            if "locality" in change:
                family = replace(family, locality_weight=float(change["locality"]))
            if "norm" in change:
                family = replace(family, norm_weight=float(change["norm"]))
            if "layers" in change:
                family = replace(family, layers=parse_layers(change["layers"]))
            if "lr" in change:
                family = replace(family, learning_rate=float(change["lr"]))
            settings["family"] = family
            facts = sets[name]
            t0 = time.monotonic()
            result, locality, peft_model = train_and_measure(
                load,
                facts,
                int(change.get("rank", args.rank)),
                args.seed,
                args.max_steps,
                **settings,
            )
            seconds = time.monotonic() - t0
            baseline = baseline or seconds
            trained = by_form(peft_model, sets["measure-trained"], tok.pad_token_id)
            held = by_form(peft_model, sets["measure-held-out"], tok.pad_token_id)
            ell = sum(len(f.target_ids) for f in facts)
            rows.append(
                f"| {kind} | {variant} | {len(facts)} | {ell} | {seconds / baseline:.2f}x "
                f"({result.steps} steps) | {trained['prompt']:.3f} / {trained['paraphrase']:.3f}"
                f" / {trained['chat']:.3f} | {held['paraphrase']:.3f} / {held['chat']:.3f} | "
                f"{locality.token_agreement:.3f} | {locality.prompts_unchanged:.2f} |"
            )
            print(rows[-1], flush=True)
            if name == args.serve_variant and args.serve:
                adapters[kind] = work / kind  # the last such variant's adapter
                peft_model.save_pretrained(adapters[kind])
                if args.gate:  # the base model's states: the adapter's layer and below
                    base_model = peft_model.unload()
                    layer = first_adapted_layer(family)
                    Gate.build(base_model, tok, facts, layer).save(adapters[kind])
                questions[kind] = chat_questions(tok, sets)
    print(f"\nrank {args.rank}, default family, seed {args.seed}, {args.facts} facts per kind\n")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    print("\n".join(rows))
    if adapters:
        print("\nthrough vLLM's /v1/chat/completions (greedy):")
        for kind, scores in serve_check(folder, adapters, questions, work, args.gate).items():
            line = ", ".join(f"{g} {h}/{n}" for g, (h, n) in scores.items())
            print(f"- {kind}: {line}")


if __name__ == "__main__":
    main()
