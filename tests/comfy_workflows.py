"""The shipped workflows, and the canvas-to-API conversion ComfyUI's frontend does (COMFYUI_HOST.md §5).

`ui_to_api` maps each node's positional `widgets_values` to input names in the node's widget order from
`/object_info` (an INT with control_after_generate and a combo with an image upload button carry one extra
value), and each link to `[source node id, output slot]`. Comparing its result with the shipped API files
checks that the two formats describe the same graph and that the widget values sit in the right order.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
WORKFLOW_NAMES = ("turbodiffusion_wan2.1_t2v_1.3b", "turbodiffusion_wan2.2_i2v_a14b")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def load_ui_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def widget_slots(info: dict) -> list[tuple[str, bool]]:
    """(input name, is a real value) for each widgets_values entry of a node type, in order."""
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = [*info["input_order"].get("required", []), *info["input_order"].get("optional", [])]
    slots = []
    for name in order:
        spec = inputs[name]
        options = spec[1] if len(spec) > 1 else {}
        if not (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) or options.get("forceInput"):
            continue
        slots.append((name, True))
        if options.get("control_after_generate") or options.get("image_upload"):
            slots.append((name, False))
    return slots


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for a canvas workflow (no muted nodes, no subgraphs)."""
    links = {row[0]: row for row in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        slots = widget_slots(object_info[node["type"]])
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            raise ValueError(
                f"node {node['id']} ({node['type']}) has {len(values)} widget values, its widgets are "
                f"{[name for name, _ in slots]}"
            )
        inputs = {name: value for (name, real), value in zip(slots, values) if real}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return prompt


def strip_meta(prompt: dict) -> dict:
    return {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in prompt.items()}


def with_overrides(prompt: dict, overrides: dict[str, dict]) -> dict:
    """A copy of an API prompt with some inputs replaced: {node id: {input: value}}."""
    prompt = copy.deepcopy(prompt)
    for node_id, inputs in overrides.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def node_id_of(prompt: dict, class_type: str) -> str:
    """The id of the only node of a type in an API prompt."""
    (node_id,) = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return node_id
