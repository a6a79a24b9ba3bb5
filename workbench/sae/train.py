"""Training SAEs with SAELens's own training runner on a hook of a loaded checkpoint.

The runner (`LanguageModelSAETrainingRunner`) is given our HookedTransformer and the corpus as a
pre-tokenized dataset of fixed-length windows, so nothing is downloaded. Architectures:

* `standard` — ReLU SAE with an L1 penalty on feature activations weighted by decoder norms
  (Bricken et al. 2023, "Towards Monosemanticity"); `l1_coefficient` sets the sparsity;
* `topk` — keeps the k largest pre-activations (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders"); `k` sets L0 directly, with the auxiliary loss that revives dead features.

A trained SAE is written in SAELens's disk format, so `SAE.load_from_disk` reads it back.
"""

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from workbench.attribution.batches import model_device
from workbench.errors import BadInput
from workbench.models.base import LoadedModel
from workbench.sae.corpus import Corpus
from workbench.sae.options import SaeTraining
from workbench.sae.saes import LoadedSae, activation_size, prepare

logger = logging.getLogger(__name__)


def train_sae(loaded: LoadedModel, corpus: Corpus, cfg: SaeTraining, output_dir: Path) -> LoadedSae:
    """Train with SAELens's runner and save to `output_dir` in SAELens's disk format."""
    import datasets
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    cfg.check()
    d_in = activation_size(loaded, cfg.hook)
    d_sae = cfg.d_sae or cfg.expansion * d_in
    if cfg.architecture == "topk" and cfg.k > d_sae:
        raise BadInput(f"--k {cfg.k}: larger than the SAE's {d_sae} features")
    sae_cfg: Any
    if cfg.architecture == "topk":
        sae_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=cfg.k)
    else:
        sae_cfg = StandardTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, l1_coefficient=cfg.l1_coefficient
        )
    ctx = corpus.context_size
    batch = cfg.batch_size_tokens
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=loaded.checkpoint.checkpoint_id,
        hook_name=cfg.hook,
        dataset_path=corpus.name,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=ctx,
        prepend_bos=False,  # windows already carry BOS where documents start
        sequence_separator_token=None,
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=batch,
        store_batch_size_prompts=max(1, min(64, 4096 // ctx)),
        n_batches_in_buffer=max(16, math.ceil(4 * batch / ctx)),
        lr=cfg.lr,
        lr_warm_up_steps=0,
        device=str(model_device(loaded.model)),
        seed=cfg.seed,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(output_dir),
        verbose=False,
        n_batches_for_norm_estimate=10,
        n_eval_batches=2,
        eval_batch_size_prompts=8,
        model_from_pretrained_kwargs={},
    )
    dataset = datasets.Dataset.from_dict({"tokens": corpus.windows.tolist()})
    torch.manual_seed(cfg.seed)
    sae_logger = logging.getLogger("sae_lens")
    level = sae_logger.level
    # it warns that we pass our own model and dataset, and logs an error for hook_z activations
    # it cannot `view` before falling back to `reshape`
    sae_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = LanguageModelSAETrainingRunner(
                runner_cfg, override_dataset=dataset, override_model=loaded.model
            )
            trained = runner.run()
    finally:
        sae_logger.setLevel(level)
    loaded.model.eval()
    logger.info("trained %s SAE (%d features) at %s", cfg.architecture, d_sae, cfg.hook)
    from sae_lens import SAE

    device = model_device(loaded.model)
    sae = SAE.load_from_disk(str(output_dir), device=str(device))  # the inference form, as saved
    del trained
    return LoadedSae(
        prepare(sae, device), cfg.hook, sae.cfg.architecture(), "trained", str(output_dir)
    )
