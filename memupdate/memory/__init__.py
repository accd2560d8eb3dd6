"""The memory science: facts, recall, MemFT training, the Parametric Memory Law, planning.

Plain torch/peft/transformers: nothing here imports gRPC or vLLM.
"""
