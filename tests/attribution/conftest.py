"""Attribution fixtures: tiny random models (GPT-2, and Llama with grouped-query attention) with
six induction prompts."""

import pytest

from workbench.attribution.batches import make_batches
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tiny_hf_dirs):
    loaded = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs[request.param]))[0])
    return loaded.model, make_batches(load_task("induction", loaded, n_prompts=6))
