from memupdate.memory.encoding import EncodedFact, encode_facts, model_context_length
from memupdate.memory.fact_sets import biography_facts, phonebook_facts
from memupdate.memory.novelty import EXAMPLES, in_context, novel_share


def encoded(i: int, form: str, target: tuple[int, ...]) -> EncodedFact:
    return EncodedFact(i, f"f{i} {form}", (100 + i, 300 if form == "chat" else 301), target, form)


def test_each_sequence_is_shown_after_others_of_its_form_and_never_after_its_own_answer():
    facts = [encoded(i, form, (i % 4, 7)) for i in range(12) for form in ("prompt", "chat")]
    shown = in_context(facts, max_length=10_000)
    assert len(shown) == len(facts)
    by_ids = {tuple(f.input_ids): f for f in facts}
    for before, after in zip(facts, shown, strict=True):
        assert after.target_ids == before.target_ids and after.form == before.form
        assert after.prompt_ids[-2:] == before.prompt_ids  # the sequence itself comes last
        context = after.prompt_ids[:-2]
        assert len(context) == EXAMPLES * 4  # four other 4-token sequences
        for k in range(0, len(context), 4):
            other = by_ids[context[k : k + 4]]
            assert other.form == before.form and other.target_ids != before.target_ids
    # A tight context holds fewer examples, never a truncated one.
    assert all(len(s.prompt_ids) <= 2 + 4 * 2 for s in in_context(facts, max_length=12))


def test_templated_facts_have_fewer_novel_tokens_than_random_digits(default):
    """Biographies repeat a template the base model predicts once it has seen a few; phone
    numbers are random digits it cannot predict (measured: 0.40-0.44 against 0.91 of ℓ)."""
    model, tok = default
    shares = {}
    for name, facts in (("bio", biography_facts(16, seed=5)), ("phone", phonebook_facts(16, 5))):
        shares[name] = novel_share(
            model, encode_facts(facts, tok, model_context_length(model)), tok.pad_token_id
        )
    assert shares["bio"] < 0.6 < 0.8 < shares["phone"], shares


def test_a_plan_of_a_large_base_counts_its_novel_tokens(default):
    """Biographies at ℓ about 2,000 are past what rank 1 holds: the planner measures their share
    and the shipped law plans for ℓ × share, a smaller rank than at every token (at ℓ 3,010 it
    chose 4 against 8, and rank 2 was enough). A small base is planned at rank 1 without the
    pass."""
    from memupdate.memory.adapter import choose_family
    from memupdate.memory.base_model import ModelIdentity
    from memupdate.memory.law import ParametricMemoryLaw
    from memupdate.memory.planning import plan_update, shipped_law_path

    model, tok = default
    identity, family = ModelIdentity("SmolLM2-135M-Instruct", "af7a85575389cc2d"), choose_family(30)
    law = ParametricMemoryLaw.load(shipped_law_path(identity, family))
    assert law.length == "novel"
    context = model_context_length(model)
    large = encode_facts(biography_facts(70, seed=9), tok, context)
    plan = plan_update(model, large, tok.pad_token_id, identity, family, 0.9, law=law)
    assert plan.novel_share is not None and 0.3 < plan.novel_share < 0.6
    assert plan.law_length == round(plan.sequence_length * plan.novel_share)
    every_token = law.plan(plan.sequence_length, 0.9, plan.loss_before_nats, max_rank=64)[0]
    assert plan.rank < every_token.rank
    small = encode_facts(biography_facts(5, seed=9), tok, context)
    plan = plan_update(model, small, tok.pad_token_id, identity, family, 0.9, law=law)
    assert plan.rank == 1 and plan.novel_share is None
