"""Stored token strings as each token's text (schema v11): the checkpoints whose rows still hold
their tokenizer's pieces ("ĠParis" for " Paris") are rewritten with their own tokenizer, from the
token ids stored beside the strings (`workbench.store.token_text`). Pipeline runs do this first;
`workbench migrate` does it for every checkpoint."""

import logging

from workbench.errors import BadInput
from workbench.store.db import Store
from workbench.store.session import StoreSession
from workbench.store.token_text import pending, rewrite, token_ids

logger = logging.getLogger(__name__)


def decode_pending(store: Store) -> list[str]:
    """Rewrite the token strings of every pending checkpoint whose tokenizer loads (from its
    directory, or the local Hugging Face cache for a hub model); the checkpoints left pending,
    each logged with the reason."""
    todo = pending(store)
    if not todo:
        return []
    from workbench.models.base import token_texts
    from workbench.models.sources import load_tokenizer

    left = []
    for checkpoint_id, path in todo:
        try:
            if path is None:
                raise BadInput("no checkpoint row says where it was loaded from")
            tokenizer = load_tokenizer(path)
        except BadInput as err:
            logger.warning(
                "%s: its stored token strings stay its tokenizer's pieces (%s)", checkpoint_id, err
            )
            left.append(checkpoint_id)
            continue
        texts = None
        if tokenizer is not None:
            ids = token_ids(store, checkpoint_id)
            texts = dict(zip(ids, token_texts(tokenizer, ids), strict=True))
        rewrite(store, checkpoint_id, texts)
        logger.info("%s: stored token strings rewritten as token texts", checkpoint_id)
    return left


def decode_pending_of(session: StoreSession) -> list[str]:
    """`decode_pending` through a runner's session (waiting for the lock as its runs do)."""
    with session.store(purpose="rewrite stored token strings") as store:
        return decode_pending(store)
