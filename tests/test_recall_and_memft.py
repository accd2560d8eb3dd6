from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from memupdate.memory.adapter import default_family, params_per_rank
from memupdate.memory.encoding import encode_facts
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.facts import Fact
from memupdate.memory.frozen_prefix import (
    FrozenPrefix,
    TopLayers,
    first_adapted_layer,
    native_bf16,
    pack,
)
from memupdate.memory.locality import retain_set
from memupdate.memory.memft import (
    TrainSettings,
    threshold_weights,
    train_adapter,
    weighted_loss,
)
from memupdate.memory.recall import (
    collate,
    greedy_check,
    measure_recall,
    summarize,
    target_logprobs,
    token_probabilities,
)


def encoded(tok, n=10, seed=1):
    return encode_facts(phonebook_facts(n, seed=seed), tok, 256)


def settings(model, **kw):
    # The tiny random model learns fastest at the paper's 1e-2.
    # The locality term is tested on its own (test_locality.py).
    family = replace(
        default_family(model.config.num_hidden_layers), learning_rate=1e-2, locality_weight=0.0
    )
    return TrainSettings(rank=8, family=family, **{"max_steps": 600, **kw})


def test_target_logprobs_match_a_full_forward(tiny):
    model, tok = tiny
    facts = encoded(tok, 4)
    batch = collate(facts, tok.pad_token_id)
    with torch.no_grad():
        fast = target_logprobs(model, batch)
        full = torch.log_softmax(
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1
        )
    expected = full[batch.rows, batch.cols].gather(1, batch.labels[:, None]).squeeze(1)
    assert torch.allclose(fast, expected, atol=1e-5)
    # Each fact's target tokens, in order, are what the batch labels.
    assert batch.labels.tolist() == [t for f in facts for t in f.target_ids]


def test_probabilities_come_back_in_the_facts_order_whatever_the_batching(tiny):
    """Batches are formed by length; each fact still gets its own probabilities."""
    model, tok = tiny
    facts = encoded(tok, 3) + encode_facts([Fact(text="a much longer text " * 6)], tok, 256)
    facts = [facts[3], facts[0], facts[2], facts[1]]  # long first: batches reorder them
    alone = [token_probabilities(model, [f], tok.pad_token_id)[0] for f in facts]
    for got, want in zip(token_probabilities(model, facts, 0, batch_size=2), alone, strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_summary_distinguishes_token_and_fact_recall(tiny):
    _, tok = tiny
    facts = encoded(tok, 2)
    n0, n1 = len(facts[0].target_ids), len(facts[1].target_ids)
    probs = [torch.full((n0,), 0.9), torch.tensor([0.9] * (n1 - 1) + [0.5])]
    report = summarize(facts, probs)
    assert report.fact_recall == 0.5  # 0.5 is not > 0.5
    assert report.token_recall == pytest.approx((n0 + n1 - 1) / (n0 + n1))
    assert report.min_prob == 0.5 and report.min_prob_fact == facts[1].source
    assert report.failing == [facts[1].source]


def test_memft_loss_puts_no_gradient_on_passed_tokens():
    logp = torch.log(torch.tensor([0.9, 0.3, 0.55, 0.1])).requires_grad_()
    weighted_loss(logp, threshold_weights(logp, threshold=0.6)).backward()
    assert logp.grad[0] == 0 and logp.grad[2] != 0  # 0.55 is under the 0.6 threshold
    assert torch.allclose(logp.grad[[1, 2, 3]], torch.full((3,), -1 / 3))
    passed = torch.log(torch.tensor([0.9, 0.8])).requires_grad_()
    assert weighted_loss(passed, threshold_weights(passed, threshold=0.6)) is None  # no step


@pytest.mark.parametrize("first", [0, 1, 2])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_frozen_prefix_gives_the_full_models_target_logprobs(tiny, first, attention):
    """Running only the layers from `first` up on cached hidden states is the full model."""
    from peft import get_peft_model

    model, tok = tiny
    facts = encoded(tok, 6)
    family = replace(default_family(model.config.num_hidden_layers), layers=(first,))
    peft_model = get_peft_model(model, family.lora_config(4))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so the adapted layer matters
            torch.nn.init.normal_(p, std=0.1)
    prefix = FrozenPrefix(peft_model, facts, first)
    with torch.no_grad():
        full = target_logprobs(peft_model, collate([facts[i] for i in (4, 0, 2)], 0))
        peft_model.get_base_model().set_attn_implementation(attention)
        cached, _ = prefix.target_logprobs(peft_model, [4, 0, 2])
    assert torch.allclose(cached, full, atol=1e-5)
    # The check of every fact (batched by length, packed: two or three to a row) hands each
    # fact its own probabilities.
    assert prefix.batch(list(range(6)))[0].positions.shape[0] < 6
    cached_all = prefix.token_probabilities(peft_model)
    full_all = token_probabilities(peft_model, facts, 0)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cached_all, full_all, strict=True))


def test_packing_places_every_sequence_once_within_the_width():
    lengths = [55, 43, 13, 18, 50, 14, 21, 16]
    width, rows = pack(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= width for row in rows)
    assert len(rows) * width < len(lengths) * max(lengths)  # fewer slots than padding
    assert pack([7]) == (7, [[0]])


def test_the_compiled_step_computes_what_the_eager_step_computes(tiny):
    """torch.compile changes how the layers above the prefix run, not their values or the
    adapter's gradients (fp32); and it really compiled, rather than falling back to eager."""
    from peft import get_peft_model

    model, tok = tiny
    facts = encoded(tok, 6)
    family = default_family(model.config.num_hidden_layers)
    peft_model = get_peft_model(model, family.lora_config(4))
    lora = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    prefix = FrozenPrefix(peft_model, facts, first_adapted_layer(family))
    runs = []
    for compiled in (False, True):
        top = TopLayers(peft_model, prefix.first, compiled=compiled)
        logp, _ = prefix.target_logprobs(peft_model, [4, 0, 2], top)
        logp.sum().backward()
        runs.append((logp.detach(), [p.grad.clone() for p in lora]))
        peft_model.zero_grad(set_to_none=True)
    assert top._compiled is not None
    (eager, eager_grads), (fast, fast_grads) = runs
    assert torch.allclose(fast, eager, atol=1e-5)
    for a, b in zip(fast_grads, eager_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("terms", [{}, {"locality_weight": 0.0, "norm_weight": 10.0}])
def test_a_compiled_training_with_a_locality_term_reaches_full_recall(tiny, caplog, terms):
    """In a worker thread, as the service trains: torch.compile works off the main thread, with
    the KL term (the default family's) and with the update's norm, whose whitening puts a hook
    on each LoRA A inside the compiled layers."""
    model, tok = tiny
    family = replace(default_family(model.config.num_hidden_layers), learning_rate=1e-2, **terms)
    config = TrainSettings(rank=8, family=family, max_steps=600, compile=True)
    retain = retain_set(model, tok, family)
    with ThreadPoolExecutor(1) as worker:
        _, result = worker.submit(
            train_adapter, model, encoded(tok, 6), tok.pad_token_id, config, retain=retain
        ).result()
    assert result.success and result.recall.fact_recall == 1.0
    assert "torch.compile failed" not in caplog.text


def test_memft_reaches_full_recall_and_greedy_reproduces_every_target(tiny):
    model, tok = tiny
    facts = encoded(tok, 10)
    before = measure_recall(model, facts, tok.pad_token_id)
    assert before.fact_recall == 0.0  # the random model knows none of them
    peft_model, result = train_adapter(model, facts, tok.pad_token_id, settings(model))
    assert result.success and result.stop_reason == "all target tokens passed"
    assert result.recall.fact_recall == 1.0 and result.recall.token_recall == 1.0
    assert result.recall.min_prob > 0.5 + TrainSettings.margin
    assert result.loss_reduction_nats > 0
    # The guarantee: every token past 0.5 => greedy decoding reproduces the target.
    greedy = greedy_check(peft_model, facts, tok.pad_token_id)
    assert greedy.exact == greedy.checked == 10


def test_uniform_baseline_uses_the_same_stopping_rule(tiny):
    model, tok = tiny
    _, result = train_adapter(
        model, encoded(tok, 6), tok.pad_token_id, settings(model, mode="uniform")
    )
    assert result.success and result.recall.fact_recall == 1.0


def test_budget_exhaustion_reports_what_is_missing(tiny):
    model, tok = tiny
    facts = encoded(tok, 10)
    _, result = train_adapter(model, facts, tok.pad_token_id, settings(model, max_steps=3))
    assert not result.success
    assert result.stop_reason == "budget: steps" and result.steps == 3
    assert result.recall.fact_recall < 1.0
    assert result.recall.failing and set(result.recall.failing) <= {f.source for f in facts}


def test_training_is_seeded_and_deterministic(tiny_dir):
    from memupdate.memory.base_model import load_model

    weights = []
    for _ in range(2):
        model, tok = load_model(tiny_dir)
        peft_model, _ = train_adapter(
            model, encoded(tok, 5), tok.pad_token_id, settings(model, max_steps=15)
        )
        weights.append({k: v.clone() for k, v in peft_model.state_dict().items() if "lora" in k})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_steps_run_in_bf16_only_where_the_cpu_computes_bf16(tiny):
    # Emulated bf16 is far slower than fp32 (an AVX2-only CPU: 120x on a matrix product), so
    # by default a training uses it only where the hardware has it; asked for, it is used.
    caps = torch.cpu.get_capabilities()
    hardware = any(caps.get(k, False) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    assert native_bf16() == hardware
    model, tok = tiny
    facts = encoded(tok, 3)
    peft_model, result = train_adapter(model, facts, tok.pad_token_id, settings(model, max_steps=2))
    assert result.bf16_steps == hardware
    peft_model.unload()
    _, forced = train_adapter(
        model, facts, tok.pad_token_id, settings(model, max_steps=2, bf16=True)
    )
    assert forced.bf16_steps


def test_unload_gives_back_the_untouched_base(tiny):
    model, tok = tiny
    facts = encoded(tok, 4)
    before = measure_recall(model, facts, tok.pad_token_id)
    peft_model, _ = train_adapter(model, facts, tok.pad_token_id, settings(model, max_steps=20))
    base = peft_model.unload()
    after = measure_recall(base, facts, tok.pad_token_id)
    assert after.mean_loss_nats == pytest.approx(before.mean_loss_nats, abs=1e-6)


def test_params_per_rank_counts_adapted_linears_only(tiny):
    model, _ = tiny
    family = default_family(model.config.num_hidden_layers)
    cfg = model.config
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    expected = (d + d) * 2 + (d + kv) * 2 + (d + f) * 2 + (f + d)  # q,o; k,v; gate,up; down
    assert params_per_rank(model, family) == expected


def test_params_per_rank_is_the_same_inside_a_peft_model(tiny):
    model, tok = tiny
    family = default_family(model.config.num_hidden_layers)
    plain = params_per_rank(model, family)
    peft_model, _ = train_adapter(
        model, encoded(tok, 2), tok.pad_token_id, settings(model, max_steps=1)
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert params_per_rank(peft_model, family) == plain
    assert trainable == 8 * plain  # rank 8


@pytest.mark.parametrize("new_rank", [4, 8])
def test_warm_start_keeps_outputs_when_the_rank_grows(tiny, tmp_path, new_rank):
    """A saved rank-4 adapter loaded into a rank-4 or rank-8 adapter of the same family gives
    the same target log-probabilities before any training, and then learns new facts too."""
    from peft import get_peft_model

    from memupdate.memory.warm_start import warm_start

    model, tok = tiny
    old, new = encoded(tok, 6, seed=1), encoded(tok, 4, seed=2)
    trained, result = train_adapter(model, old, tok.pad_token_id, replace(settings(model), rank=4))
    assert result.success
    trained.save_pretrained(tmp_path / "v1")
    saved = torch.cat(token_probabilities(trained, old, tok.pad_token_id))
    base = trained.unload()

    grown = get_peft_model(base, settings(base).family.lora_config(new_rank))
    assert warm_start(grown, tmp_path / "v1") == 4
    assert torch.allclose(
        torch.cat(token_probabilities(grown, old, tok.pad_token_id)), saved, atol=1e-5
    )
    base = grown.unload()

    both = [*old, *new]
    peft_model, warm = train_adapter(
        base,
        both,
        tok.pad_token_id,
        replace(settings(base), rank=new_rank),
        start_from=tmp_path / "v1",
    )
    assert warm.success and warm.recall.fact_recall == 1.0
    # It started from what v1 knew: the old facts passed at the first check.
    assert warm.history[0]["fact_recall"] >= len(old) / len(both)


def test_warm_start_refuses_another_family(tiny, tmp_path):
    from peft import get_peft_model

    from memupdate.memory.warm_start import WarmStartError, warm_start

    model, tok = tiny
    family = settings(model).family
    saved = get_peft_model(model, family.lora_config(4))
    saved.save_pretrained(tmp_path / "v1")
    base = saved.unload()
    other = get_peft_model(base, replace(family, target_modules=("down_proj",)).lora_config(4))
    with pytest.raises(WarmStartError, match="other modules"):
        warm_start(other, tmp_path / "v1")
    base = other.unload()
    smaller = get_peft_model(base, family.lora_config(2))
    with pytest.raises(WarmStartError, match="rank 4, more than 2"):
        warm_start(smaller, tmp_path / "v1")


def test_an_interrupted_training_leaves_the_base_model_as_it_was(tiny):
    """A cancelled job raises from the progress callback: no LoRA layer may stay behind in the
    model the next job trains."""
    model, tok = tiny
    facts = encoded(tok, 4)
    names = [n for n, _ in model.named_modules()]

    def cancel(progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, facts, tok.pad_token_id, settings(model), cancel)
    assert [n for n, _ in model.named_modules()] == names
    _, result = train_adapter(model, facts, tok.pad_token_id, settings(model))
    assert result.success


def test_a_family_can_step_its_b_matrices_at_their_own_rate(tiny):
    """LoRA+ (bench/base_size.py): with `b_lr_ratio` the B matrices take AdamW steps at that
    multiple of the rate. AdamW's first step moves each parameter by about the rate, and only B
    moves then (A's gradient is zero while B is), so the largest B entry after one step is the
    rate times the ratio."""
    model, tok = tiny
    base = settings(model, max_steps=1)
    for ratio in (1.0, 4.0):
        one_step = replace(base, family=replace(base.family, b_lr_ratio=ratio))
        peft_model, result = train_adapter(model, encoded(tok, 4), tok.pad_token_id, one_step)
        assert result.optimizer_steps == 1
        b = [p.detach() for n, p in peft_model.named_parameters() if ".lora_B." in n]
        assert max(float(p.abs().max()) for p in b) == pytest.approx(1e-2 * ratio, rel=1e-3)
        model = peft_model.unload()


def test_optimizer_settings_are_part_of_the_family_only_when_changed():
    """A family recorded before the optimizer settings existed (its law's identity) reads back
    the same; a changed one keeps its settings; wrong values are refused."""
    from memupdate.memory.adapter import AdapterFamily

    family = default_family(30)
    assert AdapterFamily.from_dict(family.to_dict()) == family
    assert not {"b_lr_ratio", "grad_clip", "adam_beta2"} & set(family.to_dict())
    changed = replace(family, b_lr_ratio=4.0, grad_clip=2.0, adam_beta2=0.99)
    assert AdapterFamily.from_dict(changed.to_dict()) == changed
    for wrong in ({"b_lr_ratio": 0.0}, {"grad_clip": -1.0}, {"adam_beta2": 1.0}):
        with pytest.raises(ValueError):
            replace(family, **wrong)
