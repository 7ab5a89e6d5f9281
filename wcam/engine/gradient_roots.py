"""Which hooked layer outputs a backward must be asked for, so that it reaches all the others on its way.

``torch.autograd.grad(objective, outputs)`` returns, and so holds until the backward ends, one gradient per
requested tensor: for resnet50 at batch 8 that is 340 MiB of gradients nobody reads once the hooks have taken
their channel means. Asking only for the outputs with no other hooked output upstream of them (the roots:
in a CNN, the stem conv) runs the backward through exactly the same nodes, fires every hook on the way, and
frees each gradient as soon as the op below it has used it.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor
from torch.autograd.graph import get_gradient_edge


def gradient_roots(objective: Tensor, outputs: Sequence[Tensor]) -> tuple[set[int], list[int]]:
    """``(reached, roots)``: the indices of the ``outputs`` that ``objective`` depends on, and those among
    them below which (towards the input) no other output of ``outputs`` lies.

    A backward asked for the roots alone executes the grad node of every reached output (each one has a path
    down to a root), so a tensor hook on each reached output fires. One walk over the autograd graph below
    ``objective``, iterative (graphs of thousands of nodes), each node expanded once.
    """
    by_node: dict[Any, list[int]] = {}  # grad node (an AccumulateGrad for a leaf) -> indices of its outputs
    for index, output in enumerate(outputs):
        if output.requires_grad:
            by_node.setdefault(get_gradient_edge(output).node, []).append(index)
    children: dict[Any, list[Any]] = {}  # grad node -> the nodes below it; set when it is first visited
    holds: dict[Any, bool] = {}  # grad node -> an output's node is this one or lies below it
    stack = [objective.grad_fn] if objective.grad_fn is not None else []
    while stack:  # depth first; a node is finished when it comes back to the top after its children
        node = stack[-1]
        below = children.get(node)
        if below is None:
            below = children[node] = [child for child, _ in node.next_functions if child is not None]
            stack.extend(child for child in below if child not in children)
            continue
        stack.pop()
        if node not in holds:
            holds[node] = node in by_node or any(holds[child] for child in below)
    reached: set[int] = set()
    roots: list[int] = []
    for node, indices in by_node.items():
        if node in holds:
            reached.update(indices)
            if not any(holds[child] for child in children[node]):
                roots.extend(indices)
    return reached, sorted(roots)
