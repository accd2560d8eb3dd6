from dataclasses import replace

import pytest
import torch

from memupdate.memory.adapter import default_family, params_per_rank
from memupdate.memory.encoding import encode_facts
from memupdate.memory.memft import TrainSettings, memft_loss, train_adapter
from memupdate.memory.phonebook import phonebook_facts
from memupdate.memory.recall import (
    collate,
    greedy_check,
    measure_recall,
    summarize,
    target_logprobs,
)


def encoded(tok, n=10, seed=1):
    return encode_facts(phonebook_facts(n, seed=seed), tok, 256)


def settings(model, **kw):
    # The tiny random model learns fastest at the paper's 1e-2.
    family = replace(default_family(model.config.num_hidden_layers), learning_rate=1e-2)
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
    memft_loss(logp, threshold=0.6).backward()
    assert logp.grad[0] == 0 and logp.grad[2] != 0  # 0.55 is under the 0.6 threshold
    assert torch.allclose(logp.grad[[1, 2, 3]], torch.full((3,), -1 / 3))
    passed = torch.log(torch.tensor([0.9, 0.8])).requires_grad_()
    memft_loss(passed, threshold=0.6).backward()  # none left: the ordinary mean
    assert torch.allclose(passed.grad, torch.full((2,), -0.5))


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
