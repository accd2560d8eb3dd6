"""Routing among adapters: could a request be sent to the adapter of the update that holds its
fact, so that each update trains an adapter of its own and never touches the old ones?

One adapter per update makes an update cost what is new at any base size, but only if a request
lands on its own fact's adapter. Stored forms always do (an exact match); the question is the
wordings nobody stored. For every held-out paraphrase and question (fact_sets.FORMS, never
stored) this finds the most similar stored form (prompt, trained paraphrases, trained questions)
under several similarity measures, and reports the share whose nearest stored form belongs to
their own fact, and to their own update of 10 (facts 0-9, 10-19, ...):

- `last`: the prompt gate's own key, the base model's state entering the adapted layer at the
  text's last token (cosine);
- `mean`: the same states averaged over the text's tokens;
- `maxsim-L`: token-level late interaction (ColBERT's MaxSim) on the states entering layer L:
  each request token's best cosine match among the stored form's tokens, averaged; L 0 is the
  token embeddings;
- `words`: the router the service ships (memory/routing.py): TF-IDF cosine over lower-cased
  words, a verbatim stored text to its own owner, ties to the newest.

Nothing is trained; base-model states only.

    cd bench && ../.venv/bin/python routing.py --kinds all --sizes 40,300
"""

import torch
from common import kinds, parser, setup

from memupdate.memory.adapter import default_family
from memupdate.memory.fact_sets import KINDS
from memupdate.memory.frozen_prefix import _run_layers, first_adapted_layer
from memupdate.memory.routing import WordRouter


def token_states(model, tokenizer, texts: list[str], layer: int) -> list[torch.Tensor]:
    """Per text, the unit-length states entering `layer` at each of its tokens (base model);
    batched with right padding, which causal attention never lets a real token see."""
    decoder = model.get_decoder()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            ids = [tokenizer(t)["input_ids"] for t in texts[start : start + 64]]
            width = max(map(len, ids))
            batch = torch.tensor([i + [0] * (width - len(i)) for i in ids])
            hidden = _run_layers(decoder, decoder.embed_tokens(batch), decoder.layers[:layer])
            hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
            out += [h[: len(i)] for h, i in zip(hidden, ids, strict=True)]
    return out


def nearest_by_vectors(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return (queries @ keys.T).argmax(1)


def nearest_by_maxsim(queries: list[torch.Tensor], keys: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat(keys)  # every stored token
    owner = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor([len(k) for k in keys]))
    best = []
    for q in queries:
        sims = q @ flat.T  # (query tokens, stored tokens)
        per_key = torch.full((len(q), len(keys)), -2.0).scatter_reduce(
            1, owner.expand(len(q), -1), sims, reduce="amax"
        )
        best.append(int(per_key.mean(0).argmax()))
    return torch.tensor(best)


def nearest_by_words(queries: list[str], keys: list[str]) -> torch.Tensor:
    """The product's router (memory/routing.py), each stored form its own owner."""
    router = WordRouter(keys, list(range(len(keys))))
    routed = (router.route(q) for q in queries)
    return torch.tensor([-1 if r is None else r for r in routed])  # -1: no stored form


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="40", help="knowledge-base sizes (facts), comma-separated")
    p.add_argument("--maxsim-layers", default="0,25", help="maxsim layers (empty: none)")
    args = p.parse_args()
    _, load = setup(args)
    model, tok = load()
    gate_layer = first_adapted_layer(default_family(model.config.num_hidden_layers))
    maxsim_layers = [int(x) for x in args.maxsim_layers.split(",") if x]
    layers = sorted({gate_layer, *maxsim_layers})
    rows = []
    for size in map(int, args.sizes.split(",")):
        for kind in kinds(args):
            trained = KINDS[kind](size, seed=args.seed, forms="trained")
            held = KINDS[kind](size, seed=args.seed, forms="held_out")
            keys = [(i, t) for i, f in enumerate(trained) for t in (f.prompt, *f.paraphrases)]
            keys += [(i, t) for i, f in enumerate(trained) for t in f.questions]
            queries = [(i, t) for i, f in enumerate(held) for t in (*f.paraphrases, *f.questions)]
            key_owner = torch.tensor([i for i, _ in keys])
            query_owner = torch.tensor([i for i, _ in queries])
            key_texts, query_texts = [t for _, t in keys], [t for _, t in queries]
            states = {
                layer: (
                    token_states(model, tok, key_texts, layer),
                    token_states(model, tok, query_texts, layer),
                )
                for layer in layers
            }
            k, q = states[gate_layer]
            nearest = {
                "last": nearest_by_vectors(
                    torch.stack([s[-1] for s in q]), torch.stack([s[-1] for s in k])
                ),
                "mean": nearest_by_vectors(
                    torch.stack([s.mean(0) for s in q]), torch.stack([s.mean(0) for s in k])
                ),
            }
            for layer in maxsim_layers:
                stored, asked = states[layer]
                nearest[f"maxsim-{layer}"] = nearest_by_maxsim(asked, stored)
            nearest["words"] = nearest_by_words(query_texts, key_texts)
            unrouted = torch.cat([key_owner, torch.tensor([-(10**9)])])  # index -1: nobody
            for name, chosen in nearest.items():
                owner = unrouted[chosen]
                same_fact = float((owner == query_owner).float().mean())
                same_update = float((owner // 10 == query_owner // 10).float().mean())
                rows.append(f"| {kind} | {size} | {name} | {same_fact:.3f} | {same_update:.3f} |")
                print(rows[-1], flush=True)
    print(f"\nseed {args.seed}; held-out forms routed by their most similar stored form\n")
    print("| kind | facts | similarity | to its own fact | to its own update of 10 |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
