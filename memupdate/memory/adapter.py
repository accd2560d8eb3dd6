"""The adapter family: which modules and layers get LoRA, with what alpha, learning rate and
training terms.

The family is part of the law's identity: a law fitted for one family says nothing about
another. Rank is the one free dimension the law chooses.
"""

from dataclasses import asdict, dataclass, replace

ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Ranks the planner may choose from. vLLM's --max-lora-rank must be one of
# 1, 8, 16, 32, 64, 128, 256, 320, 512, but any adapter rank up to that slot size is served.
RANK_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The default family's locality weight. Measured (bench/locality.py, docs/benchmarks.md): on 20
# phone numbers with the adapter on layer 20, weight 0 / 1 / 4 / 16 kept 0.84 / 0.96 / 0.97 / 0.98
# of next-token answers on unrelated text, at 1.0 / 1.7 / 2.5 / 3.7 times the training time.
DEFAULT_LOCALITY_WEIGHT = 4.0
# MemFT's training line at the default rate (memory/memft.py, bench/memft_vs_uniform.py).
DEFAULT_TRAIN_UNTIL = 0.9


@dataclass(frozen=True)
class AdapterFamily:
    target_modules: tuple[str, ...] = ATTENTION_AND_MLP
    # Layer indices to adapt; None means every layer. A narrow placement makes capacity per
    # rank small enough that the rank choice matters (docs/memory.md, "Adapter family").
    layers: tuple[int, ...] | None = None
    alpha: float = 32.0  # the paper's lora_alpha
    # The paper uses 1e-2; on SmolLM2-135M with all projections of one layer adapted that made
    # recalled facts flip back and forth (docs/memory.md, "Adapter family").
    learning_rate: float = 1e-3
    dropout: float = 0.0
    # Weight of the training's locality term: KL to the base model's next-token distributions on
    # unrelated text, added to the fact loss (memory/locality.py). 0 turns it off.
    locality_weight: float = 0.0
    # Weight of the update's norm on unrelated text: how far the adapter moves each adapted
    # projection's output on the retain text's activations, relative to the projection's own
    # output (memory/locality.py, UpdateNorm). It needs no forward pass per step. 0 turns it off.
    norm_weight: float = 0.0
    # MemFT trains a target token until its p is above this line (memory/memft.py): the band
    # above the stopping threshold is a margin against drift. A larger rate needs a higher line
    # (bench/memft_vs_uniform.py: at 5e-3, 0.9 took 2.2x the steps of 0.99 on phone numbers).
    train_until: float = DEFAULT_TRAIN_UNTIL
    # The optimizer's settings, kept at torch's defaults by every shipped family: LoRA+'s rate
    # for the B matrices as a multiple of the learning rate (Hayou et al. 2024), the gradient
    # norm a step is clipped at (0: none) and AdamW's second-moment decay. Measured at the gated
    # rate (bench/base_size.py, docs/benchmarks.md "A 1,000-fact base from scratch"): LoRA+ at
    # 2-16x diverged, clipping started learning earlier but finished later, and beta2 0.99 won
    # on one seed and lost on another (1.44x and 2.1x on counterfactual updates); none is adopted.
    b_lr_ratio: float = 1.0
    grad_clip: float = 0.0
    adam_beta2: float = 0.999

    def __post_init__(self):
        for term in ("locality_weight", "norm_weight"):
            if getattr(self, term) < 0:
                raise ValueError(f"{term} must be at least 0 (0 turns the term off)")
        if not 0.5 < self.train_until < 1:
            raise ValueError(f"train_until must be in (0.5, 1), got {self.train_until}")
        if self.b_lr_ratio <= 0:
            raise ValueError(f"b_lr_ratio must be positive, got {self.b_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be at least 0 (0 turns it off), got {self.grad_clip}")
        if not 0 < self.adam_beta2 < 1:
            raise ValueError(f"adam_beta2 must be in (0, 1), got {self.adam_beta2}")

    @property
    def keeps_locality(self) -> bool:
        """Whether its trainings carry a locality term (and so need a retain set)."""
        return bool(self.locality_weight or self.norm_weight)

    def lora_config(self, rank: int):
        from peft import LoraConfig

        return LoraConfig(
            r=rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=list(self.layers) if self.layers is not None else None,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["layers"] = list(self.layers) if self.layers is not None else None
        for name, default in ADDED_LATER.items():
            if data[name] == default:  # as recorded before the setting existed: laws still fit
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterFamily":
        data = {**ADDED_LATER, **data}  # families recorded before these settings existed
        data["target_modules"] = tuple(data["target_modules"])
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        return cls(**data)


# Settings added after laws were first recorded, with the value every law recorded before them
# had: a family stores them only where it differs, so its identity (and its law) stays the same.
ADDED_LATER = {
    "locality_weight": 0.0,
    "norm_weight": 0.0,
    "train_until": DEFAULT_TRAIN_UNTIL,
    "b_lr_ratio": 1.0,
    "grad_clip": 0.0,
    "adam_beta2": 0.999,
}


def default_family(num_layers: int) -> AdapterFamily:
    """All attention and MLP projections of one layer at five sixths of the depth: for
    SmolLM2-135M, layer 25 of 30. The paper places its adapter at about two thirds (layer 20 of
    30 here); measured on SmolLM2 (docs/benchmarks.md, "Where the adapter sits"), layer 25 lets
    facts be recalled from wordings that were not trained (held-out questions 0.80 against 0.475
    for counterfactual updates) and trains in 0.54-0.85x the time, at the same locality."""
    return AdapterFamily(
        layers=(min(num_layers - 1, (5 * num_layers) // 6),),
        locality_weight=DEFAULT_LOCALITY_WEIGHT,
    )


def gated_family(num_layers: int) -> AdapterFamily:
    """The family jobs train when the service gates prompts (memory/gate.py): the default
    family at lr 5e-3 with the training line at 0.99. A gated adapter answers only prompts close
    to its facts, so what a larger rate costs in the adapter's own locality (token agreement
    0.88-0.95 against 0.93-0.97) no longer reaches general prompts, and what it buys stays:
    0.39-0.93x the steps, more facts per rank within the jobs' budget, and held-out wordings
    reached far more often (biographies 0.85 / 0.80 of held-out paraphrases / questions against
    0.525 / 0.287; docs/benchmarks.md, "The gated family" and "A larger rate and the 0.99
    line")."""
    return replace(default_family(num_layers), learning_rate=5e-3, train_until=0.99)


def check_modules(modules) -> list[str]:
    """Refuse projection names the family cannot adapt (before any model or server starts)."""
    unknown = sorted(set(modules) - set(ATTENTION_AND_MLP))
    if unknown:
        raise ValueError(f"unknown projection(s) {unknown}; choose from {list(ATTENTION_AND_MLP)}")
    return list(modules)


def check_layers(layers, num_layers: int | None = None) -> list[int]:
    """Refuse negative or repeated layer indices and, given the model's depth, layers it lacks
    (before any training starts)."""
    layers = list(layers)
    wrong = sorted({i for i in layers if i < 0 or (num_layers is not None and i >= num_layers)})
    if wrong:
        depth = f"0 to {num_layers - 1}" if num_layers is not None else "numbered from 0"
        raise ValueError(f"no layer {wrong} to adapt; this model's layers are {depth}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"a layer is named twice in {layers}")
    return layers


def choose_family(
    num_layers: int,
    modules: tuple[str, ...] | None = None,
    layers: tuple[int, ...] | None | str = "default",
    learning_rate: float | None = None,
    locality_weight: float | None = None,
    norm_weight: float | None = None,
    train_until: float | None = None,
    gated: bool = False,
) -> AdapterFamily:
    """The default family (the gated one for a service that gates prompts) with any setting a
    user gave replaced (command flags, service config). `layers=None` means every layer;
    "default" keeps the family's placement."""
    family = gated_family(num_layers) if gated else default_family(num_layers)
    check_modules(modules or ())
    if modules:
        family = replace(family, target_modules=tuple(modules))
    if layers != "default":
        family = replace(
            family, layers=None if layers is None else tuple(check_layers(layers, num_layers))
        )
    if learning_rate:
        family = replace(family, learning_rate=learning_rate)
    if locality_weight is not None:
        family = replace(family, locality_weight=locality_weight)
    if norm_weight is not None:
        family = replace(family, norm_weight=norm_weight)
    if train_until is not None:
        family = replace(family, train_until=train_until)
    return family


def adapted_linears(model, family: AdapterFamily):
    """(name, linear) of each projection the family adapts, named as in the bare model (inside a
    peft-wrapped model, the original linear under its usual name)."""
    import torch

    layers = set(family.layers) if family.layers is not None else None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        parts = name.split(".")
        if parts[-1] not in family.target_modules:
            continue
        if layers is not None:
            index = next((int(p) for p in parts if p.isdigit()), None)
            if index not in layers:
                continue
        yield name, module


def params_per_rank(model, family: AdapterFamily) -> int:
    """Trainable LoRA parameters per unit of rank: sum of (in + out) over adapted linears."""
    return sum(m.in_features + m.out_features for _, m in adapted_linears(model, family))


class AdapterMismatch(ValueError):
    """A folder handed in as an adapter is not a peft LoRA adapter for this base model."""


def _shapes(path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}


def check_adapter_for_model(adapter_dir, model_dir) -> int:
    """Refuse anything but a peft LoRA adapter whose every matrix fits the base model's module
    it adapts (read from the safetensors headers; nothing is loaded). Returns the rank."""
    import json
    from pathlib import Path

    adapter_dir, model_dir = Path(adapter_dir), Path(model_dir)
    config_file = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    for required in (config_file, weights):
        if not required.is_file():
            raise AdapterMismatch(f"{adapter_dir}: not a peft adapter folder (no {required.name})")
    try:
        config = json.loads(config_file.read_text())
        rank = config["r"]
        peft_type = config.get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise AdapterMismatch(f"{config_file}: not a peft adapter config ({err})") from None
    if peft_type != "LORA" or not isinstance(rank, int) or rank < 1:
        raise AdapterMismatch(f"{config_file}: expected a LoRA adapter with r >= 1")
    try:
        lora = _shapes(weights)
        base: dict[str, tuple[int, ...]] = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            base.update(_shapes(shard))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise AdapterMismatch(f"cannot read {weights}: {err}") from None
    matrices = [k for k in lora if ".lora_A." in k or ".lora_B." in k]
    if not matrices:
        raise AdapterMismatch(f"{weights} holds no LoRA matrices")
    for key in matrices:
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        if f"{module}.weight" not in base:
            raise AdapterMismatch(f"{adapter_dir}: adapts {module}, which this base model lacks")
        out_features, in_features = base[f"{module}.weight"]
        expected = (rank, in_features) if ".lora_A." in key else (out_features, rank)
        if lora[key] != expected:
            raise AdapterMismatch(
                f"{adapter_dir}: {key} has shape {lora[key]}, but this base model needs "
                f"{expected} at rank {rank}: the adapter was made for another model"
            )
    return rank
