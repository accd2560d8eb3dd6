"""vLLM plugin: a LoRA resolver that maps a knowledge base name to its live adapter version in
memupdate's registry, so a restarted or new replica pointed at the same registry folder serves
the current knowledge without anyone re-posting it.

Install memupdate in vLLM's environment; vLLM finds the `vllm.general_plugins` entry point.
Set MEMUPDATE_REGISTRY to the registry folder and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (vLLM
only consults resolvers then, for a name that is not loaded yet). With VLLM_PLUGINS set, it must
include `memupdate`.
"""

import os

REGISTRY_ENV = "MEMUPDATE_REGISTRY"


def register() -> None:
    """Entry point called by vLLM in every process it starts."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    from memupdate.serving.registry import Registry, RegistryError

    root = os.environ.get(REGISTRY_ENV)
    if not root:
        return  # not configured: the plugin stays out of the way

    class MemupdateResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str):
            try:
                live = Registry(root).live(lora_name)
            except RegistryError:
                return None  # not a knowledge base name: let other resolvers try
            if live is None:
                return None
            # vLLM replaces the id with its own counter; any positive value will do here.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(live.path))

    LoRAResolverRegistry.register_resolver("memupdate", MemupdateResolver())
