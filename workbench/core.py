"""The workbench's vocabulary: graph nodes and their ids, edges, hook names and metrics, and
the current time as the workbench writes it into the store (`utc_now`).

This module is the single owner of two public contracts (docs/architecture.md, "The vocabulary"):

* **node ids**: `input`, `r{L}` (residual stream before layer L), `a{L}` (attention layer),
  `a{L}.h{H}` (a head's output), `a{L}.h{H}<q|k|v|pattern>` (a head's query, key or value input,
  or its pattern), `m{L}` (an MLP), `logits`, `f:{sae_id}:{i}` (feature i of an SAE) and
  `f:{sae_id}:err` (an SAE's error term). `Node.id` formats them, `Node.parse` reads them; no
  other module builds or splits an id.
* **hook names** of TransformerLens models (`blocks.{L}.attn.hook_z`, ...): `Hook` names them,
  `Node.out_hook` / `Node.in_hook` say where a node writes and reads.

It imports neither torch nor duckdb, so the app, the SQL helpers and every compute module share it.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

NodeKind = Literal["input", "resid", "attn", "attn_head", "mlp", "logits", "feature", "sae_error"]
PORTS = ("q", "k", "v", "pattern")
QKV = ("q", "k", "v")
PORT_LABELS = {"q": "query input", "k": "key input", "v": "value input", "pattern": "pattern"}

_HEAD = re.compile(r"^a(\d+)\.h(\d+)(?:<(q|k|v|pattern)>)?$")
_LAYERED = re.compile(r"^([ram])(\d+)$")
_LAYERED_KIND: dict[str, NodeKind] = {"r": "resid", "a": "attn", "m": "mlp"}
_KIND_LETTER = {kind: letter for letter, kind in _LAYERED_KIND.items()}


@dataclass(frozen=True)
class Node:
    """One node of a model's graph. Build one with the constructors (`Node.head_of(1, 0, "k")`,
    `Node.mlp(2)`, ...), read an id with `Node.parse`, format one with `.id`."""

    kind: NodeKind
    layer: int | None = None
    head: int | None = None
    port: str | None = None
    sae_id: str | None = None
    feature: int | None = None

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def input(cls) -> "Node":
        return cls("input")

    @classmethod
    def logits(cls) -> "Node":
        return cls("logits")

    @classmethod
    def resid(cls, layer: int) -> "Node":
        return cls("resid", layer)

    @classmethod
    def attn(cls, layer: int) -> "Node":
        return cls("attn", layer)

    @classmethod
    def mlp(cls, layer: int) -> "Node":
        return cls("mlp", layer)

    @classmethod
    def head_of(cls, layer: int, head: int, port: str | None = None) -> "Node":
        if port is not None and port not in PORTS:
            raise ValueError(f"{port!r} is not a head port ({', '.join(PORTS)})")
        return cls("attn_head", layer, head, port or None)

    @classmethod
    def sae_feature(cls, sae_id: str, feature: int) -> "Node":
        return cls("feature", sae_id=sae_id, feature=feature)

    @classmethod
    def sae_error(cls, sae_id: str) -> "Node":
        return cls("sae_error", sae_id=sae_id)

    # -- the id contract ------------------------------------------------------------------
    @property
    def id(self) -> str:
        kind = self.kind
        if kind in ("input", "logits"):
            return kind
        if kind == "attn_head":
            port = f"<{self.port}>" if self.port else ""
            return f"a{self.layer}.h{self.head}{port}"
        if kind in _KIND_LETTER:
            return f"{_KIND_LETTER[kind]}{self.layer}"
        if kind == "feature":
            return f"f:{self.sae_id}:{self.feature}"
        if kind == "sae_error":
            return f"f:{self.sae_id}:err"
        raise ValueError(f"unknown node kind {kind!r}")

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, node_id: str) -> "Node":
        """The node an id names; `ValueError` naming the id if it follows no known form."""
        if node_id in ("input", "logits"):
            return cls(node_id)  # type: ignore[arg-type]
        head = _HEAD.match(node_id)
        if head:
            return cls("attn_head", int(head.group(1)), int(head.group(2)), head.group(3))
        layered = _LAYERED.match(node_id)
        if layered:
            return cls(_LAYERED_KIND[layered.group(1)], int(layered.group(2)))
        if node_id.startswith("f:") and node_id.count(":") >= 2:
            sae_id, tail = node_id[2:].rsplit(":", 1)
            if tail == "err":
                return cls.sae_error(sae_id)
            if tail.isdigit():
                return cls.sae_feature(sae_id, int(tail))
        raise ValueError(f"{node_id!r} is not a node id")

    @classmethod
    def try_parse(cls, node_id: str) -> "Node | None":
        try:
            return cls.parse(node_id)
        except ValueError:
            return None

    # -- relations ------------------------------------------------------------------------
    @property
    def base(self) -> "Node":
        """A head's port node without its port (the head); any other node itself."""
        return Node("attn_head", self.layer, self.head) if self.port else self

    @property
    def is_head(self) -> bool:
        """A head's output node (`a{L}.h{H}`, no port)."""
        return self.kind == "attn_head" and self.port is None

    @property
    def is_sae_node(self) -> bool:
        return self.kind in ("feature", "sae_error")

    def label(self, hook: str | None = None) -> str:
        """What the app shows beside the id."""
        kind = self.kind
        if kind == "attn_head":
            base = f"L{self.layer}H{self.head}"
            return f"{self.base.id} {PORT_LABELS[self.port]}" if self.port else base
        if kind == "resid":
            return f"residual stream before layer {self.layer}"
        if kind == "attn":
            return f"attention layer {self.layer}"
        if kind == "mlp":
            return f"MLP {self.layer}"
        if kind == "input":
            return "embeddings"
        if kind == "feature":
            return f"{hook} #{self.feature}"
        if kind == "sae_error":
            return f"{hook} SAE error"
        return kind

    # -- hooks ----------------------------------------------------------------------------
    def out_hook(self) -> str:
        """The hook holding what this node writes into the residual stream (a head's output is
        its `hook_z`, to be multiplied by `W_O`)."""
        layer = self.layer if self.layer is not None else -1
        if self.kind == "input":
            return Hook.resid_pre(0)
        if self.kind == "attn_head" and self.port is None:
            return Hook.z(layer)
        if self.kind == "mlp":
            return Hook.mlp_out(layer)
        if self.kind == "attn":
            return Hook.attn_out(layer)
        if self.kind == "resid":
            return Hook.resid_pre(layer)
        raise ValueError(f"{self.id} writes to no hook")

    def in_hook(self, n_layers: int) -> str:
        """The hook holding what this node reads from the residual stream (with split q/k/v
        inputs and `hook_mlp_in` switched on); `logits` reads the final residual stream."""
        layer = self.layer if self.layer is not None else -1
        if self.kind == "attn_head" and self.port in QKV:
            return Hook.qkv_input(layer, self.port)
        if self.kind == "mlp":
            return Hook.mlp_in(layer)
        if self.kind == "logits":
            return Hook.resid_post(n_layers - 1)
        if self.kind == "resid":
            return Hook.resid_pre(layer)
        raise ValueError(f"{self.id} reads from no hook")


def node_id(node: Node | str) -> str:
    return node if isinstance(node, str) else node.id


# A scored edge: (source node id, destination node id, score). Plain tuples keep the millions of
# edges of a real model cheap; `Node.parse` reads either end.
Edge = tuple[str, str, float]


class Hook:
    """TransformerLens hook names. The only place a hook name is spelled out."""

    EMBED = "hook_embed"
    POS_EMBED = "hook_pos_embed"
    FINAL_SCALE = "ln_final.hook_scale"

    @staticmethod
    def resid_pre(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    @staticmethod
    def resid_mid(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_mid"

    @staticmethod
    def resid_post(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    @staticmethod
    def attn_out(layer: int) -> str:
        return f"blocks.{layer}.hook_attn_out"

    @staticmethod
    def mlp_in(layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_in"

    @staticmethod
    def mlp_out(layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    @staticmethod
    def z(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    @staticmethod
    def qkv(layer: int, port: str) -> str:
        """A head's query, key or value vectors (`port` q, k or v)."""
        return f"blocks.{layer}.attn.hook_{port}"

    @staticmethod
    def qkv_input(layer: int, port: str) -> str:
        """A head's query, key or value input (needs `use_split_qkv_input`)."""
        return f"blocks.{layer}.hook_{port}_input"

    @staticmethod
    def pattern(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    @staticmethod
    def layer(hook: str) -> int | None:
        """The block a hook belongs to (None outside the blocks)."""
        match = _BLOCK_HOOK.match(hook)
        return int(match.group(1)) if match else None

    @staticmethod
    def depth(hook: str, n_layers: int) -> float:
        """Position of a hook along the forward pass, in layers: `resid_pre(L)` is L,
        `resid_post(L)` is L + 1, the final residual stream is n_layers."""
        if hook in {Hook.EMBED, Hook.POS_EMBED}:
            return 0.0
        if hook.startswith("ln_final"):
            return float(n_layers)
        match = _BLOCK_HOOK.match(hook)
        if not match:
            return 0.0
        layer, rest = int(match.group(1)), match.group(2)
        return layer + _WITHIN_BLOCK.get(rest, 0.5)

    @staticmethod
    def stop_layer(hook: str) -> int | None:
        """The `stop_at_layer` that still computes `hook` (None: the whole model)."""
        layer = Hook.layer(hook)
        return None if layer is None else layer + 1

    @staticmethod
    def reads_residual(hook: str) -> bool:
        """A hook holding a residual-stream-shaped vector (`d_model` wide)."""
        return hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Where, within a block, each hook reads: a fraction of the way through the layer.
_WITHIN_BLOCK = {
    "hook_resid_pre": 0.0,
    "ln1.hook_normalized": 0.05,
    "attn.hook_z": 0.3,
    "hook_attn_out": 0.35,
    "hook_resid_mid": 0.5,
    "ln2.hook_normalized": 0.55,
    "mlp.hook_pre": 0.6,
    "mlp.hook_post": 0.7,
    "hook_mlp_out": 0.8,
    "hook_resid_post": 1.0,
}


@dataclass(frozen=True)
class Metric:
    """What a task measures at the last position of each prompt, averaged over prompts."""

    name: str
    description: str
    # KL compares with the clean run's distribution, so its clean value is 0 by construction
    reference: bool = False


# Tokens a batch holds at most unless `--batch-tokens` says otherwise. A run's peak memory is
# about a fixed part plus c x batch tokens, c measured per method by benchmarks/bench_memory.py
# (docs/benchmarks.md): this keeps every method on a SmolLM2-135M-size model within 16 GB.
DEFAULT_BATCH_TOKENS = 2048

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("logit_diff", "logit(answer) - logit(wrong)"),
        Metric("prob_diff", "p(answer) - p(wrong), softmax over the vocabulary"),
        Metric("logprob", "log p(answer)"),
        Metric(
            "kl",
            "KL(clean || run) of the next-token distribution (lower is cleaner)",
            reference=True,
        ),
    )
}
DEFAULT_METRIC = "logit_diff"


def metric_named(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r} (choose from {', '.join(METRICS)})")
    return METRICS[name]


def utc_now() -> datetime:
    """The current time in UTC without a time zone, as the store's TIMESTAMP columns hold it."""
    return datetime.now(UTC).replace(tzinfo=None)
