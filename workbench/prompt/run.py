"""`workbench run prompt`: compute one prompt's views (`workbench.prompt.views`), the input
attribution of its prediction (`workbench.prompt.inputattr`), its Patchscope
(`workbench.prompt.patchscope`) and the newest tuned lens of the checkpoint (`workbench run
tuned-lens`) on it, at each chosen checkpoint, without holding the database; then store each in
one short transaction. Views are cached by prompt_id (checkpoint, tokens, tau), the attribution
by explanation_id (checkpoint, tokens, target, parameters), the Patchscope by patchscope_id
(checkpoint, tokens, template, parameters), the lens's predictions by (prompt_id, lens_id): what
is stored already is not computed again unless `force`.

A prompt longer than the model's context (`n_ctx` in its config) is BadInput before the model
runs; so are a target the tokenizer splits, a method asked for by name that does not apply to
the architecture, and a Patchscope template that does not fit the context. Attention flow taking
longer than `flow_seconds` (`--flow-seconds`, 300 by default, 0 for no limit) is BadInput too;
in every case nothing of that checkpoint is stored."""

import logging
from dataclasses import asdict, replace

from tqdm.auto import tqdm

from workbench.errors import BadInput
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.models.base import LoadedModel
from workbench.models.sources import select_checkpoints
from workbench.prompt.inputattr import (
    METHODS,
    AttributionParams,
    applicable,
    check_params,
    explain,
    explanation_id,
    explanation_rows,
    target_token,
)
from workbench.prompt.lensrun import lens_rows
from workbench.prompt.patchscope import (
    IDENTITY_IDS,
    IDENTITY_TEMPLATE,
    PatchscopeParams,
    check_inspector,
    patchscope_id,
    template_ids,
)
from workbench.prompt.patchscope import patchscope as run_patchscope
from workbench.prompt.tunedlens import load_tuned_lens
from workbench.prompt.views import (
    DEFAULT_FLOW_SECONDS,
    DEFAULT_TAU,
    lens_ids,
    prompt_id,
    prompt_views,
    view_rows,
)
from workbench.rows import loaded_rows
from workbench.store import Store
from workbench.tasks import load_task

logger = logging.getLogger(__name__)

DEFAULT_PATCHSCOPE = PatchscopeParams()


def run_prompt(
    model: str,
    *,
    text: str | None = None,
    task: str | None = None,
    index: int = 0,
    checkpoint: str = "latest",
    tau: float = DEFAULT_TAU,
    device: str = "cpu",
    dtype: str = "float32",
    db: str | None = None,
    force: bool = False,
    flow_seconds: float = DEFAULT_FLOW_SECONDS,
    target: str | None = None,
    methods: tuple[str, ...] | None = None,
    attribution: AttributionParams | None = None,
    patchscope: PatchscopeParams | None = DEFAULT_PATCHSCOPE,
) -> list[tuple[str, str]]:
    """[(prompt_id, 'done' or 'cached')] per checkpoint; `flow_seconds` 0: no limit. `methods`
    None: every input-attribution method that applies to the model (those that do not are left
    out); a tuple: exactly those (one that does not apply is BadInput); () for none.
    `patchscope` None: no Patchscope."""
    if (text is None) == (task is None):
        raise BadInput("give the prompt as --text TEXT, or as --task NAME_OR_JSONL --index I")
    if not 0 < tau < 1:
        raise BadInput(f"--tau {tau}: must be between 0 and 1")
    if index < 0:
        raise BadInput(f"--index {index}: must be 0 or more")
    if not flow_seconds >= 0:
        raise BadInput(f"--flow-seconds {flow_seconds}: must be 0 (no limit) or more")
    base = attribution or AttributionParams()
    check_params(base)
    refs = select_checkpoints(resolve_checkpoints(model), checkpoint)
    inspector = _inspector(patchscope, device=device, dtype=dtype)
    done: list[tuple[str, str]] = []
    for ref in tqdm(refs, desc="prompt checkpoints", disable=len(refs) < 2):
        loaded = load_checkpoint(ref, device=device, dtype=dtype)
        reader = inspector or loaded
        if inspector is not None and patchscope is not None:
            check_inspector(loaded.model, inspector.model, patchscope.target_layer)
        ids, shown = prompt_ids(loaded, text=text, task=task, index=index)
        if len(ids) < 2:
            raise BadInput(f"the prompt is {len(ids)} token long: it needs at least 2")
        checkpoint_id = loaded.checkpoint.checkpoint_id
        pid = prompt_id(checkpoint_id, ids, tau)
        registry = loaded_rows(loaded)
        target_id = _target_id(loaded, ids, target)
        chosen = methods
        if chosen is None:
            chosen = tuple(m for m in METHODS if applicable(loaded.model, m) is None)
        else:
            for method in chosen:
                reason = applicable(loaded.model, method)
                if reason is not None:
                    raise BadInput(f"--attribution {method}: {reason}")
        params = replace(base, methods=chosen)
        eid = explanation_id(checkpoint_id, ids, target_id, params)
        inspect = (
            None
            if patchscope is None
            else template_ids(
                patchscope.template or _default_template(reader),
                reader.encode if reader.tokenizer is not None else None,
                reader.model.cfg.d_vocab,
            )
        )
        reader_id = reader.checkpoint.checkpoint_id
        with Store(db) as store:
            lens_head = store.tuned_lens_of(checkpoint_id)
            lid = None if lens_head is None else str(lens_head["lens_id"])
            need_lens = lid is not None and (force or not store.has_prompt_lens(pid, lid))
            need_views = force or not store.has_prompt_views(pid)
            need_attr = bool(chosen) and (force or not store.has_explanation(eid))
            psid = None
            if patchscope is not None and inspect is not None:
                scope_key = asdict(patchscope) | {"model": reader_id, "checkpoint": None}
                psid = patchscope_id(checkpoint_id, ids, inspect, scope_key)
                need_scope = force or not store.has_patchscope(psid)
            else:
                need_scope = False
        if not (need_views or need_attr or need_scope or need_lens):
            logger.info("prompt %s at %s: stored already", pid, checkpoint_id)
            done.append((pid, "cached"))
            continue
        views_rows = None
        if need_views:
            views = prompt_views(loaded.model, ids, tau, flow_seconds=flow_seconds or None)
            named = lens_ids(views)
            views_rows = view_rows(
                views,
                pid=pid,
                checkpoint_id=checkpoint_id,
                text=shown,
                tokens=loaded.token_strs(ids),
                names=dict(zip(named, loaded.token_strs(named), strict=True)),
                tau=tau,
            )
        attr_rows = None
        if need_attr:
            found = explain(loaded.model, ids, target_id, params)
            attr_head = {
                "explanation_id": eid,
                "prompt_id": pid,
                "checkpoint_id": checkpoint_id,
                "target_id": target_id,
                "target": loaded.token_strs([target_id])[0],
                "target_logit": found.target_logit,
                "target_prob": found.target_prob,
                "baseline_logit": found.baseline_logit,
                "top_k": found.top_k,
                "params": params.as_dict(),
            }
            attr_rows = (attr_head, explanation_rows(found, explanation_id=eid))
        scope_rows = None
        if need_scope and patchscope is not None and inspect is not None and psid is not None:
            decoded = run_patchscope(
                loaded.model,
                ids,
                inspect,
                source_position=patchscope.source_position,
                target_layer=patchscope.target_layer,
                new_tokens=patchscope.new_tokens,
                inspector=None if inspector is None else inspector.model,
            )
            scope_head = {
                "patchscope_id": psid,
                "prompt_id": pid,
                "checkpoint_id": checkpoint_id,
                "inspector_id": reader_id,
                "template": patchscope.template or _default_template(reader),
                "template_ids": inspect,
                "source_position": patchscope.source_position % len(ids),
                "target_layer": patchscope.target_layer,
                "new_tokens": patchscope.new_tokens,
            }
            scope_rows = (
                scope_head,
                [
                    {
                        "patchscope_id": psid,
                        "source_layer": s,
                        "target_layer": t,
                        "token_ids": d,
                        "text": reader.decode(d),
                    }
                    for s, t, d in decoded
                ],  # fmt: skip
            )
        lens_rows_found = None
        if need_lens and lens_head is not None and lid is not None:
            lens, _ = load_tuned_lens(str(lens_head["path"]))
            lens_rows_found = lens_rows(loaded, lens, lid, pid, ids)
        with Store(db) as store:
            if views_rows is not None:
                store.save_prompt_views(views_rows, registry)
            if lens_rows_found is not None and lid is not None:
                store.save_prompt_lens(pid, lid, lens_rows_found)
            if attr_rows is not None:
                store.save_explanation(attr_rows[0], attr_rows[1], registry)
            if scope_rows is not None:
                reader_rows = registry if inspector is None else loaded_rows(inspector)
                store.save_patchscope(scope_rows[0], scope_rows[1], reader_rows)
        logger.info("prompt %s at %s: stored", pid, checkpoint_id)
        done.append((pid, "done"))
    return done


def _inspector(
    patchscope: PatchscopeParams | None, *, device: str, dtype: str
) -> LoadedModel | None:
    """The model Patchscope decodes with, when it is not the source model itself."""
    if patchscope is None or patchscope.model is None:
        return None
    refs = select_checkpoints(resolve_checkpoints(patchscope.model), patchscope.checkpoint)
    if len(refs) != 1:
        raise BadInput(
            f"--patchscope-checkpoint {patchscope.checkpoint}: name one checkpoint of "
            f"{patchscope.model} (latest or a step), not {len(refs)}"
        )
    return load_checkpoint(refs[0], device=device, dtype=dtype)


def _default_template(loaded: LoadedModel) -> str:
    return IDENTITY_TEMPLATE if loaded.tokenizer is not None else IDENTITY_IDS


def _target_id(loaded: LoadedModel, ids: list[int], target: str | None) -> int:
    """`--target` as a token id, or the model's own prediction at the last position."""
    if target is not None:

        def encode(text: str) -> list[int]:
            return loaded.encode(text, prompt=False)

        has_tokenizer = loaded.tokenizer is not None
        return target_token(
            encode if has_tokenizer else None, loaded.token_strs, loaded.model.cfg.d_vocab, target
        )
    import torch

    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids], device=loaded.model.W_U.device))
    return int(logits[0, -1].argmax())


def prompt_ids(
    loaded: LoadedModel, *, text: str | None, task: str | None, index: int
) -> tuple[list[int], str]:
    """The token ids of the prompt given as `--text`, or as prompt `index` of `--task`, and its
    text; BadInput when it is empty, the task has no such prompt, or it is longer than the
    model's context."""
    if text is not None:
        if not text.strip():
            raise BadInput("--text: empty")
        ids, shown = loaded.encode(text), text
    else:
        pairs = load_task(str(task), loaded).pairs
        if index >= len(pairs):
            raise BadInput(f"--index {index}: task {task} has {len(pairs)} prompts")
        ids = list(pairs[index].clean_tokens)
        shown = pairs[index].clean_text or " ".join(loaded.token_strs(ids))
    _check_length(ids, loaded.model.cfg.n_ctx, text=text, task=task, index=index)
    return ids, shown


def _check_length(
    ids: list[int], n_ctx: int, *, text: str | None, task: str | None, index: int
) -> None:
    """BadInput when the prompt has more tokens than the model's context."""
    if len(ids) <= n_ctx:
        return
    what = "the prompt (--text)" if text is not None else f"prompt {index} of task {task}"
    raise BadInput(
        f"{what} is {len(ids)} tokens long, more than the model's context of {n_ctx} tokens "
        "(n_ctx in its config): shorten it"
    )
