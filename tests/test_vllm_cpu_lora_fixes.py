"""memupdate's replacements for vLLM's PyTorch LoRA ops against vLLM's own, on random weights:
the same results wherever every row has an adapter, and nothing for rows without one (index -1,
which vLLM's ops read as the last slot). The served behaviour is tested in test_serving.py."""

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops

from memupdate.serving import vllm_cpu_lora_fixes as fixes

ROWS, IN, RANK, OUT, SLOTS = 7, 24, 8, 40, 3
# vLLM's own ops, taken before anything applies the fixes in this process.
VLLM = {
    name: getattr(lora_ops, name) for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
}
assert all(op.__module__ == lora_ops.__name__ for op in VLLM.values())


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(ROWS, IN, generator=g),
        "a": torch.randn(SLOTS, 1, RANK, IN, generator=g),
        "b": torch.randn(SLOTS, 1, OUT, RANK, generator=g),
        "h": torch.randn(ROWS, RANK, generator=g),
        "y": torch.randn(ROWS, OUT + 5, generator=g),
        "indices": torch.tensor([2, 0, 0, 1, 2, 2, 0]),
    }


def test_shrink_matches_vllm_and_zeroes_rows_without_adapter(data):
    ours, theirs = torch.zeros(ROWS, RANK), torch.zeros(ROWS, RANK)
    fixes.bgmv_shrink(data["x"], data["a"], ours, data["indices"], 0.5)
    VLLM["bgmv_shrink"](data["x"], data["a"], theirs, data["indices"], 0.5)
    torch.testing.assert_close(ours, theirs)

    indices = torch.tensor([-1, 0, -1, 1, 2, -1, 0])
    fixes.bgmv_shrink(data["x"], data["a"], ours, indices, 0.5)
    assert ours[indices < 0].abs().max() == 0
    torch.testing.assert_close(ours[indices >= 0], theirs[indices >= 0])


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_matches_vllm_and_leaves_rows_without_adapter(data, add_inputs):
    ours, theirs = data["y"].clone(), data["y"].clone()
    fixes.bgmv_expand(data["h"], data["b"], ours, data["indices"], add_inputs)
    VLLM["bgmv_expand"](data["h"], data["b"], theirs, data["indices"], add_inputs)
    torch.testing.assert_close(ours, theirs)

    ours = data["y"].clone()
    indices = torch.tensor([-1, 0, -1, 1, 2, -1, 0])
    fixes.bgmv_expand(data["h"], data["b"], ours, indices, add_inputs)
    torch.testing.assert_close(ours[indices < 0], data["y"][indices < 0], rtol=0, atol=0)
    torch.testing.assert_close(ours[indices >= 0], theirs[indices >= 0])


def test_expand_slice_and_the_one_index_broadcast_match_vllm(data):
    ours, theirs = data["y"].clone(), data["y"].clone()
    b = data["b"][:, :, :20]
    fixes.bgmv_expand_slice(data["h"], b, ours, data["indices"], 5, 20, True)
    VLLM["bgmv_expand_slice"](data["h"], b, theirs, data["indices"], 5, 20, True)
    torch.testing.assert_close(ours, theirs)

    one = torch.tensor([1])  # one index for every row
    ours, theirs = torch.zeros(ROWS, RANK), torch.zeros(ROWS, RANK)
    fixes.bgmv_shrink(data["x"], data["a"], ours, one, 1.0)
    VLLM["bgmv_shrink"](data["x"], data["a"], theirs, one, 1.0)
    torch.testing.assert_close(ours, theirs)
    ours = torch.zeros(ROWS, RANK)
    fixes.bgmv_shrink(data["x"], data["a"], ours, torch.tensor([-1]), 1.0)
    assert ours.abs().max() == 0


def test_sgmv_ops_use_the_fixed_bgmv_once_applied(data):
    fixes.apply()
    seq_lens = torch.tensor([3, 4])
    out = torch.zeros(ROWS, RANK)
    lora_ops.sgmv_shrink(
        data["x"], data["a"], out, None, seq_lens, torch.tensor([-1, 1]), 2, 4, ROWS, 1.0
    )
    assert out[:3].abs().max() == 0  # the first sequence has no adapter
    expected = torch.zeros(4, RANK)
    fixes.bgmv_shrink(data["x"][3:], data["a"], expected, torch.tensor([1]), 1.0)
    torch.testing.assert_close(out[3:], expected)
