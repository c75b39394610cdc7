"""Token trees: drafts that branch. A proposer with several guesses for a position (Medusa's top-k per head,
lookahead's n-gram candidates) offers them all; the target verifies every node in one step, each node
attending to the sequence's tokens and to its own ancestors only, and keeps the longest path it agrees with.

A tree is its nodes' tokens and parents (-1: the sequence's last token, else an earlier node), with the
nodes of its primary chain (node i's parent i - 1) first: those are laid out in the sequence's own KV slots,
as a chain's drafts are, so a tree whose primary chain is kept needs no copying. Every other leaf is a
branch with KV blocks of its own (engine/model_runner.py lays them out).
"""

from __future__ import annotations

from dataclasses import dataclass

from nimblelm.speculative.config import MAX_SPECULATIVE_TOKENS

# Branches (leaves off the primary chains) a step verifies at most, over all its sequences: the model runner
# reserves KV blocks for this many; the trees of sequences past it are cut to their primary chains.
MAX_BRANCHES = 64


def blocks_per_branch(block_size: int) -> int:
    """KV blocks a branch's table needs past the sequence's own: a step's rows for the sequence (at most
    MAX_SPECULATIVE_TOKENS + 1 positions) can start anywhere in a block."""
    return (block_size - 1 + MAX_SPECULATIVE_TOKENS) // block_size + 1


@dataclass(frozen=True)
class DraftTree:
    tokens: list[int]
    parents: list[int]  # per node: its parent node, -1 for the sequence's last token; parents[i] < i

    def __post_init__(self):
        if len(self.tokens) != len(self.parents) or any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError(f"not a draft tree: tokens {self.tokens}, parents {self.parents}")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_paths(cls, paths: list[list[int]]) -> DraftTree:
        """The tree of the token paths merged on their common prefixes, paths[0] its primary chain (later
        paths' nodes in the order they first appear)."""
        tokens: list[int] = []
        parents: list[int] = []
        child: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for path in paths:
            parent = -1
            for token in path:
                node = child.get((parent, token))
                if node is None:
                    node = child[(parent, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                parent = node
        return cls(tokens, parents)

    def truncated(self, n: int) -> DraftTree:
        """Its first n nodes (a tree still: parents come first)."""
        return DraftTree(self.tokens[:n], self.parents[:n])

    def limited(self, max_nodes: int, max_depth: int) -> DraftTree:
        """Its first max_nodes nodes no deeper than max_depth."""
        kept: dict[int, int] = {-1: -1}  # old node -> new
        for node, (p, d) in enumerate(zip(self.parents, self.depths())):
            if len(kept) > max_nodes:
                break
            if d <= max_depth:
                kept[node] = len(kept) - 1
        nodes = [n for n in kept if n >= 0]
        return DraftTree([self.tokens[n] for n in nodes], [kept[self.parents[n]] for n in nodes])

    def chain_length(self) -> int:
        """Nodes of its primary chain: the leading nodes each the child of the one before."""
        n = 0
        while n < len(self.parents) and self.parents[n] == n - 1:
            n += 1
        return n

    def depths(self) -> list[int]:
        """Per node, its depth: 1 for the children of the sequence's last token."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth

    def path(self, node: int) -> list[int]:
        """The nodes from the root's child down to node."""
        out = [node]
        while self.parents[out[-1]] >= 0:
            out.append(self.parents[out[-1]])
        return out[::-1]

    def children(self) -> list[list[int]]:
        """Per node and then for the sequence's last token (index -1 of the list), its children in order."""
        out: list[list[int]] = [[] for _ in range(len(self.parents) + 1)]
        for node, p in enumerate(self.parents):
            out[p].append(node)
        return out

    def branches(self) -> list[list[int]]:
        """The paths (node lists from the root) to each leaf off the primary chain: the nodes that need KV
        blocks of their own, each with the ancestors it reads."""
        n = self.chain_length()
        children = self.children()
        return [self.path(leaf) for leaf in range(n, len(self.parents)) if not children[leaf]]


def as_tree(drafts: list[int] | DraftTree) -> DraftTree:
    """A chain of drafts as the tree it is."""
    if isinstance(drafts, DraftTree):
        return drafts
    return DraftTree(list(drafts), list(range(-1, len(drafts) - 1)))
