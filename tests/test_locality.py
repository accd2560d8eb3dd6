"""Locality: the shipped texts, the three figures, the KL bound and the training term."""

import re
from dataclasses import replace

import pytest
import torch
from peft import get_peft_model

from memupdate.memory.adapter import default_family
from memupdate.memory.encoding import encode_facts
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.locality import (
    TOP_K,
    locality_prompts,
    measure_locality,
    passages,
    prompts,
    retain_set,
    top_k_kl,
)
from memupdate.memory.memft import TrainSettings, train_adapter


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_measurement_text_is_large_enough_and_apart_from_the_training_text(default):
    _, tok = default
    measure = passages("measure.txt")
    tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in measure)
    assert tokens >= 5000, tokens
    assert len(locality_prompts()) >= 40
    # The text that measures is never the text that trains: no 8-word run in common.
    runs = {tuple(w[i : i + 8]) for p in measure for w in [words(p)] for i in range(len(w) - 7)}
    for p in passages("retain.txt"):
        w = words(p)
        assert not any(tuple(w[i : i + 8]) in runs for i in range(len(w) - 7)), p[:60]
    assert not set(prompts("retain_prompts.txt")) & set(locality_prompts())


def test_top_k_kl_is_a_lower_bound_of_the_full_kl_and_exact_with_every_token():
    torch.manual_seed(0)
    base = torch.log_softmax(torch.randn(6, 100) * 3, -1)
    other = torch.randn(6, 100) * 3
    full = (base.exp() * (base - torch.log_softmax(other, -1))).sum(-1)
    top = base.topk(TOP_K, -1)
    bound = top_k_kl(top.values, top.indices, other)
    assert (bound >= -1e-6).all() and (bound <= full + 1e-5).all()
    every = base.topk(100, -1)
    assert torch.allclose(top_k_kl(every.values, every.indices, other), full, atol=1e-4)


def adapted(model, scale: float):
    """The tiny model with a LoRA on layer 2 whose B matrices are `scale` x random."""
    family = default_family(model.config.num_hidden_layers)
    peft_model = get_peft_model(model, family.lora_config(4))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return peft_model


def test_an_adapter_that_changes_nothing_measures_as_the_base(tiny):
    model, tok = tiny
    report = measure_locality(adapted(model, 0.0), tok)
    assert report.token_agreement == 1.0 and report.prompts_unchanged == 1.0
    assert abs(report.kl_nats) < 1e-5
    assert report.tokens >= 1000 and report.prompts == len(locality_prompts())


def test_a_disturbing_adapter_measures_lower(tiny):
    model, tok = tiny
    report = measure_locality(adapted(model, 0.5), tok)
    assert report.token_agreement < 0.95 and report.kl_nats > 0.01
    assert report.prompts_unchanged < 1.0


def test_a_family_with_a_locality_term_needs_its_retain_set(tiny):
    model, tok = tiny
    family = replace(default_family(model.config.num_hidden_layers), locality_weight=1.0)
    facts = encode_facts(phonebook_facts(2, seed=3), tok, 256)
    with pytest.raises(ValueError, match="retain"):
        train_adapter(model, facts, tok.pad_token_id, TrainSettings(rank=2, family=family))
    assert retain_set(model, tok, replace(family, locality_weight=0.0)) is None


def test_the_locality_term_keeps_unrelated_answers_closer_to_the_base(tiny_dir):
    from memupdate.memory.base_model import load_model

    reports = {}
    for weight in (0.0, 4.0):
        model, tok = load_model(tiny_dir)
        family = replace(
            default_family(model.config.num_hidden_layers),
            learning_rate=1e-2,
            locality_weight=weight,
        )
        facts = encode_facts(phonebook_facts(8, seed=5), tok, 256)
        settings = TrainSettings(rank=8, family=family, max_steps=600)
        retain = retain_set(model, tok, family)
        peft_model, result = train_adapter(model, facts, tok.pad_token_id, settings, retain=retain)
        assert result.success  # the stopping rule is the same with the term
        reports[weight] = measure_locality(peft_model, tok)
    assert reports[4.0].kl_nats < 0.7 * reports[0.0].kl_nats, reports
    assert reports[4.0].token_agreement > reports[0.0].token_agreement, reports


def test_the_update_norm_is_the_updates_output_energy_on_the_retain_text(tiny):
    # The analytic term (second moments once, two r x r products a step) must be what the
    # adapted projections' outputs measure on the retain passages: sum over projections of
    # sum ||ΔW x||² / sum ||W x||².
    model, tok = tiny
    family = replace(default_family(model.config.num_hidden_layers), norm_weight=1.0)
    norm = retain_set(model, tok, family).norm
    peft_model = adapted(model, 0.1)
    energies = {}

    def measure(name, module):
        def hook(_, inputs, output):
            x = inputs[0]
            update = module.lora_B["default"](module.lora_A["default"](x))
            own = module.base_layer(x)
            e = energies.setdefault(name, [0.0, 0.0])
            e[0] += float((update * module.scaling["default"]).square().sum())
            e[1] += float(own.square().sum())

        return hook

    hooks = [
        m.register_forward_hook(measure(n, m))
        for n, m in peft_model.named_modules()
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
    ]
    with torch.no_grad(), peft_model.disable_adapter():  # inputs as the base model sees them
        for text in passages("retain.txt"):
            peft_model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
    for h in hooks:
        h.remove()
    assert len(energies) == len(family.target_modules)
    measured = sum(update / own for update, own in energies.values())
    assert measured > 0 and abs(float(norm(peft_model).detach()) - measured) < 1e-4 * measured


def test_the_norm_term_alone_needs_no_kl_reference_and_keeps_answers_closer(tiny_dir):
    from memupdate.memory.base_model import load_model

    reports, norms = {}, {}
    for weight in (0.0, 10.0):
        model, tok = load_model(tiny_dir)
        family = replace(
            default_family(model.config.num_hidden_layers),
            learning_rate=1e-2,
            locality_weight=0.0,
            norm_weight=weight,
        )
        facts = encode_facts(phonebook_facts(8, seed=5), tok, 256)
        retain = retain_set(model, tok, family)
        assert (retain is None) == (weight == 0) and (weight == 0 or retain.reference is None)
        settings = TrainSettings(rank=8, family=family, max_steps=600)
        peft_model, result = train_adapter(model, facts, tok.pad_token_id, settings, retain=retain)
        assert result.success  # the stopping rule is the same with the term
        reports[weight] = measure_locality(peft_model, tok)
        norms[weight] = float(
            retain_set(model, tok, replace(family, norm_weight=1.0)).norm(peft_model).detach()
        )
    assert norms[10.0] < 0.1 * norms[0.0], norms
    assert reports[10.0].kl_nats < 0.2 * reports[0.0].kl_nats, reports
    assert reports[10.0].token_agreement > reports[0.0].token_agreement + 0.2, reports


def test_the_optimizer_steps_a_in_whitened_coordinates_and_the_model_keeps_plain_a(tiny):
    # With the update's norm the optimizer steps A' = A·K^(1/2): starting changes nothing in the
    # model, and a plain gradient step on A' is the step -lr·∇A·K^(-1) on A (K scaled and
    # floored), made on the model's ordinary A matrices.
    model, tok = tiny
    family = replace(default_family(model.config.num_hidden_layers), norm_weight=1.0)
    retain = retain_set(model, tok, family)
    peft_model = adapted(model, 0.1)
    ids = torch.tensor([tok("A sentence the test feeds the model.")["input_ids"]])
    with torch.no_grad():
        before = peft_model(ids).logits
    whitening = retain.whitening(peft_model)
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, before)
    assert whitening.pairs
    for a, shadow, whiten in whitening.pairs:
        assert torch.allclose(shadow @ whiten, a, atol=1e-5)
        assert not torch.allclose(whiten, torch.eye(len(whiten)), atol=0.1)  # a real change
    params = whitening.parameters([p for p in peft_model.parameters() if p.requires_grad])
    assert not any(p is a for p in params for a, _, _ in whitening.pairs)
    optimizer = torch.optim.SGD(params, lr=0.1)
    start = [a.detach().clone() for a, _, _ in whitening.pairs]
    peft_model(ids).logits.square().mean().backward()
    grads = [a.grad.clone() for a, _, _ in whitening.pairs]
    whitening.pull_gradients()
    optimizer.step()
    whitening.push_weights()
    for (a, _, whiten), a0, g in zip(whitening.pairs, start, grads, strict=True):
        assert torch.allclose(a, a0 - 0.1 * g @ whiten @ whiten, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, before, atol=1e-4)
