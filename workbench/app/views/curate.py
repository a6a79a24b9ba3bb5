"""Curate a circuit and keep it: pin nodes, group pinned nodes into a labelled supernode,
annotate nodes and edges, save the result as a named subgraph (the app's only write, through
`Store.save_subgraph`; hidden in read-only mode, see `app.access`), and reopen a saved subgraph:
drawn with its groups collapsed into supernodes, compared with a stored circuit of its
checkpoint, exported as GraphML or JSON. Labels and notes are shown as typed, never as
Markdown."""

import pandas as pd
import streamlit as st

from workbench.app import access, data, links, queries
from workbench.app.circuit_data import Shown, triples
from workbench.app.figures import Edge
from workbench.app.views.common import pick_row
from workbench.errors import BadInput
from workbench.graph import split_port
from workbench.store import DatabaseBusy, Store
from workbench.subgraphs import GROUP_PREFIX, Subgraph, SubgraphEdge, SubgraphNode, collapse

PINS, GROUPS, NOTES = "curate_pins", "curate_groups", "curate_notes"
SAVE_WAIT_SECONDS = 10.0  # a writer holding the database: wait this long, then say so
COMPARE = {"shared": "#444444", "subgraph": "#1f77b4", "circuit": "#ff7f0e"}
GRAPH_SOURCE = "graph:"  # the source of a subgraph saved from an attribution graph


def pinned() -> set[str]:
    return set(st.session_state.get(PINS, []))


def groups() -> dict[str, list[str]]:
    return dict(st.session_state.get(GROUPS, {}))


def panel(edges: list[Edge], nodes: list[str], model_id: str, checkpoint_id: str, source: str):
    """The curation controls under the graph, for the edges shown."""
    st.subheader("Curate: pin, group, annotate, save as a subgraph")
    with st.container(border=True):
        members = [m for ms in groups().values() for m in ms]
        options = list(dict.fromkeys([*nodes, *st.session_state.get(PINS, []), *members]))
        options = [n for n in options if not n.startswith(GROUP_PREFIX)]
        pins = links.multiselect("Pinned nodes", options, key=PINS, param="pins")
        kept = [(s, d, v) for s, d, v in edges if s in pins and split_port(d)[0] in pins]
        _groups(pins)
        _notes(pins, kept)
        if not access.require_writable("Saving a subgraph"):
            return
        c1, c2 = st.columns([3, 1])
        name = c1.text_input("Subgraph name", key="curate_name")
        if c2.button("Save subgraph", key="curate_save"):
            _save(name, pins, kept, model_id, checkpoint_id, source)


def _groups(pins: list[str]) -> None:
    current = {k: [m for m in v if m in pins] for k, v in groups().items()}
    st.session_state[GROUPS] = {k: v for k, v in current.items() if v}
    c1, c2, c3 = st.columns([2, 3, 1])
    c1.text_input("Group label", key="curate_group_label")
    c2.multiselect("Group these pinned nodes", pins, key="curate_group_members")
    c3.button("Group", key="curate_group", on_click=_group)
    if st.session_state.pop("curate_group_incomplete", False):
        st.warning("A group needs a label and at least one pinned node.")
    for name, nodes in st.session_state[GROUPS].items():
        listed = ", ".join(access.literal(n) for n in nodes)
        st.markdown(f"- group {access.literal(name)}: {listed}")


def _group() -> None:
    """The Group button (a callback, so that the graph drawn next shows the group)."""
    label = str(st.session_state.get("curate_group_label", "")).strip()
    members = list(st.session_state.get("curate_group_members", []))
    if not label or not members:
        st.session_state["curate_group_incomplete"] = True
        return
    current = dict(st.session_state.get(GROUPS, {}))
    taken = {m for k, v in current.items() if k != label for m in v}
    current[label] = [m for m in members if m not in taken]
    st.session_state[GROUPS] = current


def _notes(pins: list[str], kept: list[Edge]) -> None:
    notes = {k: v for k, v in st.session_state.get(NOTES, {}).items() if k in _items(pins, kept)}
    st.session_state[NOTES] = notes
    items = _items(pins, kept)
    if not items:
        return
    c1, c2, c3 = st.columns([2, 3, 1])
    target = c1.selectbox("Annotate", items, key="curate_note_target")
    text = c2.text_input("Note", key="curate_note_text")
    if c3.button("Add note", key="curate_note_add") and target:
        if text.strip():
            notes[target] = text.strip()
        else:
            notes.pop(target, None)
    for on, text in notes.items():
        st.markdown(f"- note on {access.literal(on)}: {access.literal(text)}")


def _items(pins: list[str], kept: list[Edge]) -> list[str]:
    return list(pins) + [_edge_item(s, d) for s, d, _ in kept]


def _edge_item(src: str, dst: str) -> str:
    return f"{src} → {dst}"


def _save(
    name: str, pins: list[str], kept: list[Edge], model_id: str, checkpoint_id: str, source: str
) -> None:
    owner = {m: label for label, members in groups().items() for m in members}
    notes = st.session_state.get(NOTES, {})
    subgraph = Subgraph(
        name=name,
        model_id=model_id,
        checkpoint_id=checkpoint_id,
        source=source,
        nodes=[SubgraphNode(n, owner.get(n), notes.get(n)) for n in pins],
        edges=[SubgraphEdge(s, d, v, notes.get(_edge_item(s, d))) for s, d, v in kept],
    )
    try:
        with Store(data.db_path(), lock_wait=SAVE_WAIT_SECONDS) as store:
            sid = store.save_subgraph(subgraph)
    except DatabaseBusy as err:
        st.warning(access.plain(f"{err}. Nothing was saved; save again once the writer lets go."))
        return
    except BadInput as err:
        st.error(access.plain(err))
        return
    data.query.clear()  # type: ignore[attr-defined]  # (the saved subgraph shows at once)
    st.success(
        f"Saved subgraph `{sid}` ({len(pins)} nodes, {len(kept)} edges). "
        f"Reopen it under Show → Saved subgraph, or link `?view=circuit&subgraph={sid}`."
    )


def restore(sid: str, name: str, nodes: pd.DataFrame, edge_rows: pd.DataFrame) -> None:
    """Curate a saved subgraph again: its nodes pinned, its groups, notes and name."""
    st.session_state["curate_loaded"] = sid
    st.session_state[PINS] = nodes["node_id"].tolist()
    st.session_state[GROUPS] = {
        str(label): g["node_id"].tolist()
        for label, g in nodes.dropna(subset=["group_label"]).groupby("group_label")
    }
    notes = {str(r.node_id): str(r.note) for r in nodes.dropna(subset=["note"]).itertuples()}
    notes |= {
        _edge_item(str(r.src), str(r.dst)): str(r.note)
        for r in edge_rows.dropna(subset=["note"]).itertuples()
    }
    st.session_state[NOTES] = notes
    st.session_state["curate_name"] = name


def open_on_graph_page(sid: str, graph_id: str, model_id: str) -> None:
    """Switch to the Graph page with the graph a subgraph was saved from, the subgraph's
    nodes pinned and grouped (a button callback, run before the rerun)."""
    stored = queries.subgraphs_by_id(sid)
    if not stored.empty:
        restore(sid, str(stored["name"].iloc[0]), queries.subgraph_nodes(sid),
                queries.subgraph_edges(sid))  # fmt: skip
    st.session_state["view"] = "Graph"
    st.session_state["graph_model"] = model_id
    st.session_state["graph_pick"] = graph_id


def saved(model_id: str) -> Shown | None:
    """The 'Saved subgraph' source of the Circuit page: returns what the explorer draws."""
    stored = queries.subgraphs(model_id)
    if stored.empty:
        st.info("No saved subgraphs for this model yet: pin nodes under Curate and save them.")
        return None
    row = pick_row(stored, "subgraph_id", "Subgraph", key="curate_open", param="subgraph")
    sid = str(row["subgraph_id"])
    nodes = queries.subgraph_nodes(sid)
    edge_rows = queries.subgraph_edges(sid)
    subgraph_groups = {
        str(label): g["node_id"].tolist()
        for label, g in nodes.dropna(subset=["group_label"]).groupby("group_label")
    }
    if str(row["source"]).startswith(GRAPH_SOURCE):  # nodes of an attribution graph
        gid = str(row["source"]).removeprefix(GRAPH_SOURCE)
        st.info(f"Subgraph `{sid}` was saved from the attribution graph `{gid}`.")
        st.button(
            "Open it on the Graph page",
            on_click=open_on_graph_page,
            args=(sid, gid, model_id),
            key="curate_to_graph",
        )
        return None
    if st.session_state.get("curate_loaded") != sid:  # opening it: its pins, groups and notes
        restore(sid, str(row["name"]), nodes, edge_rows)
    edges = triples(edge_rows)
    c1, c2 = st.columns([1, 2])
    folded = links.checkbox(
        "Collapse groups into supernodes",
        key="curate_collapse",
        param="collapse",
        default=True,
        where=c1,
    )
    circuits = queries.circuits_at(str(row["checkpoint_id"]))
    choices = ["(none)", *circuits["circuit_id"].tolist()]
    names = dict(zip(circuits["circuit_id"], circuits["label"], strict=True))
    versus = links.selectbox(
        "Compare with the circuit",
        choices,
        format_func=lambda c: names.get(c, c),
        key="curate_versus",
        param="vs",
        where=c2,
    )
    drawn = collapse(edges, subgraph_groups) if folded else edges
    colours = None
    if versus != "(none)":
        theirs = queries.circuit_edges(versus)
        other = {(str(r.src), str(r.dst)) for r in theirs.itertuples()}
        mine = {(s, d) for s, d, _ in edges}
        colours = {e: COMPARE["shared" if e in other else "subgraph"] for e in mine}
        extra = [
            (str(r.src), str(r.dst), float(r.score))
            for r in theirs.itertuples()
            if (str(r.src), str(r.dst)) not in mine
        ]
        colours |= {(s, d): COMPARE["circuit"] for s, d, _ in extra}
        drawn = edges + extra  # compared edge by edge: groups stay open
        cols = st.columns(4)
        both = len(mine & other)
        cols[0].metric("in both", both)
        cols[1].metric("only in the subgraph", len(mine - other))
        cols[2].metric("only in the circuit", len(other - mine))
        union = len(mine | other)
        cols[3].metric("Jaccard", f"{both / union:.2f}" if union else "-")

    def after() -> None:
        st.caption(
            f"subgraph `{sid}` from {access.literal(row['source'])} · "
            + (
                "grey: in both · blue: only in the subgraph · orange: only in the circuit"
                if colours
                else "groups are drawn as `group:<label>`"
            )  # fmt: skip
        )
        if not nodes.dropna(subset=["note"]).empty or not edge_rows.dropna(subset=["note"]).empty:
            st.dataframe(
                pd.concat(
                    [
                        nodes.dropna(subset=["note"]).rename(columns={"node_id": "on"})[
                            ["on", "note"]
                        ],
                        edge_rows.dropna(subset=["note"]).assign(
                            on=lambda t: t["src"] + " → " + t["dst"]
                        )[["on", "note"]],
                    ]
                ),
                hide_index=True,
                key="curate_saved_notes",
            )
        _exports(sid)

    return Shown(
        drawn,
        str(row["checkpoint_id"]),
        colours=colours,
        after=after,
        source=f"subgraph:{sid}",
        groups=subgraph_groups if folded and colours is None else None,
        own_edges=edges,
    )


EXPORTS = {"graphml": ("GraphML", "application/graphml+xml"), "json": ("JSON", "application/json")}


def _exports(sid: str) -> None:
    from workbench.export import export_subgraph

    for col, (fmt, (label, mime)) in zip(st.columns(2), EXPORTS.items(), strict=True):
        col.download_button(
            f"Export {label}",
            data=lambda fmt=fmt: export_subgraph(sid, fmt, db=data.db_path()).encode(),
            file_name=f"{sid}.{fmt}",
            mime=mime,
            key=f"curate_{fmt}",
            on_click="ignore",
        )
