"""Warm starts: a new version starts from the live version's adapter, so an update costs what
is new, not the whole knowledge base.

The saved adapter is loaded into a freshly made one of the same family. When the plan asks for a
larger rank the adapter grows without changing the model's outputs: LoRA adds
(alpha / r) · B · A, so the old columns of B are scaled by r_new / r_old to keep the product, the
new columns of B are zero, and the new rows of A keep peft's random initialization (with both at
zero the new directions would never get a gradient).
"""

import json
from pathlib import Path

import torch


class WarmStartError(ValueError):
    """The saved adapter cannot start this training (another family or a larger rank)."""


def warm_start(peft_model, folder: Path) -> int:
    """Load the adapter saved in `folder` into `peft_model` (made by get_peft_model with the same
    family and a rank at least the saved one). Returns the saved rank."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        saved_rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        saved = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, KeyError, ValueError) as err:
        raise WarmStartError(f"cannot read the adapter in {folder}: {err}") from None
    fresh = get_peft_model_state_dict(peft_model)
    rank = peft_model.peft_config["default"].r
    if saved_rank > rank:
        raise WarmStartError(f"the saved adapter has rank {saved_rank}, more than {rank}")
    if set(saved) != set(fresh):
        raise WarmStartError(
            "the saved adapter adapts other modules or layers than this family "
            f"({len(set(saved) ^ set(fresh))} matrices differ)"
        )
    grown = {}
    for key, new in fresh.items():
        old = saved[key]
        value = new.clone()
        if ".lora_A." in key:  # (rank, in): old rows kept, new rows random
            value[:saved_rank] = old
        elif ".lora_B." in key:  # (out, rank): old columns rescaled, new columns zero
            value.zero_()
            value[:, :saved_rank] = old * (rank / saved_rank)
        else:
            value = old
        if value.shape != new.shape:
            raise WarmStartError(f"{key}: saved shape {tuple(old.shape)} does not fit")
        grown[key] = value.to(new.dtype)
    with torch.no_grad():
        set_peft_model_state_dict(peft_model, grown)
    return saved_rank
