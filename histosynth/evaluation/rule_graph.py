"""The workflow's rule graph (`snakemake --rulegraph` output) drawn as a PNG, laid out top to bottom
with the back edges removed."""

from __future__ import annotations

import re
from pathlib import Path

from histosynth.evaluation.figures import plt, save_figure


def read_rule_graph(dot: str):
    """The rule graph of `snakemake --rulegraph` (dot text) as a networkx DiGraph of rule names."""
    import networkx as nx

    labels = dict(re.findall(r'^\s*(\d+)\s*\[\s*label\s*=\s*"([^"]+)"', dot, flags=re.M))
    graph = nx.DiGraph()
    graph.add_nodes_from(labels.values())
    graph.add_edges_from((labels[a], labels[b]) for a, b in re.findall(r"^\s*(\d+)\s*->\s*(\d+)", dot, flags=re.M))
    if not labels:
        raise ValueError("no rules found in the dot text; is it the output of `snakemake --rulegraph`?")
    return graph


def _back_edges(graph) -> set:
    """Edges closing a loop in a depth-first walk from the rules nothing feeds: the rule graph can loop
    where the job graph does not (ratio-0 training feeds curation, which feeds the other ratios)."""
    back, state = set(), {}

    def visit(node):
        state[node] = "open"
        for nxt in sorted(graph.successors(node)):
            if state.get(nxt) == "open":
                back.add((node, nxt))
            elif nxt not in state:
                visit(nxt)
        state[node] = "done"

    for node in sorted(graph, key=lambda n: (graph.in_degree(n), n)):
        if node not in state:
            visit(node)
    return back


def plot_rule_graph(dot_path: str | Path, out: str | Path) -> Path:
    """Draw a rule graph (dot file) top to bottom, one row per dependency generation, without
    graphviz; edges closing a rule-level loop are dashed."""
    import networkx as nx

    graph = read_rule_graph(Path(dot_path).read_text())
    back = _back_edges(graph)  # rule-level loops (e.g. the baseline model feeding curation feeding mixing)
    layers = list(nx.topological_generations(nx.restricted_view(graph, [], back)))
    for depth, layer in enumerate(layers):
        for node in layer:
            graph.nodes[node]["layer"] = depth
    positions = nx.multipartite_layout(graph, subset_key="layer", align="horizontal", scale=1.0)
    positions = {node: (x, -y) for node, (x, y) in positions.items()}
    width = max(len(layer) for layer in layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.3 * width), 0.8 * len(layers) + 1))
    forward = [edge for edge in graph.edges if edge not in back]
    for edges, style in ((forward, "solid"), (sorted(back), "dashed")):
        nx.draw_networkx_edges(
            graph,
            positions,
            edgelist=edges,
            ax=ax,
            arrowsize=10,
            edge_color="#777777",
            node_size=0,
            style=style,
            min_source_margin=9,
            min_target_margin=14,
        )
    for node, (x, y) in positions.items():
        ax.text(
            x,
            y,
            node,
            ha="center",
            va="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.35", "facecolor": "#dbe9f6", "edgecolor": "#3b6ea5"},
        )
    ax.axis("off")
    return save_figure(fig, out)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m histosynth.evaluation.rule_graph", description="Report figures outside rule summarize."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rulegraph = commands.add_parser("rulegraph", help="draw `snakemake --rulegraph` output as a PNG")
    rulegraph.add_argument("dot", help="dot file written by snakemake --rulegraph")
    rulegraph.add_argument("png", help="PNG to write")
    args = parser.parse_args()
    print(plot_rule_graph(args.dot, args.png))
