"""`make demo`: generate a video with the shipped text-to-video workflow in a headless ComfyUI.

Starts ComfyUI on loopback with this pack (base directory demo_output/comfyui), queues
workflows/api/turbodiffusion_wan2.1_t2v_1.3b.json over the HTTP API, shows the progress it reports over the
websocket and prints the path of the MP4 it writes.

Model files are looked up in the ComfyUI tree's models folders ($COMFYUI_DIR/models/...) and in
demo_output/comfyui/models/. With the real files there, the workflow runs as shipped (480p, 81 frames; a GPU
is needed for reasonable times). Without them, tiny random-weight checkpoints in the release formats are
written to demo_output/comfyui/models/ and a small video is generated: it shows noise, but it exercises
every node, file format and the server round trip.
"""

from __future__ import annotations

import sys
from pathlib import Path

from comfy_host import REPO, ComfyHost, find_comfyui_dir

T2V_WORKFLOW = REPO / "workflows" / "api" / "turbodiffusion_wan2.1_t2v_1.3b.json"
DEMO_DIR = REPO / "demo_output"
BASE = DEMO_DIR / "comfyui"
# Accepted files per loader input: the shipped default first, then equivalent release files.
REAL_FILES = {
    "diffusion_models": ("TurboWan2.1-T2V-1.3B-480P.pth", "TurboWan2.1-T2V-1.3B-480P-quant.pth"),
    "vae": ("Wan2.1_VAE.pth", "wan_2.1_vae.safetensors"),
    "text_encoders": ("umt5_xxl_fp16.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"),
}
LOADER_INPUTS = {
    "diffusion_models": ("TD_WanModelLoader", "model_name"),
    "vae": ("TD_VAELoader", "vae_name"),
    "text_encoders": ("TD_TextEncoderLoader", "text_encoder_name"),
}
TINY_ROLES = {"diffusion_models": "t2v", "vae": "vae", "text_encoders": "text_encoder"}
# Small enough for a CPU: 33 frames (about 2 s) of 256x144.
TINY_VIDEO = {"width": 256, "height": 144, "num_frames": 33}
NOISE_WARNING = """
WARNING: the real checkpoints were not found, so this demo uses TINY RANDOM-WEIGHT models.
The video will be NOISE. It still runs every node and the whole ComfyUI round trip.
For a real video put these files into ComfyUI's models folders ({models}) and run `make demo` again:
  diffusion_models/TurboWan2.1-T2V-1.3B-480P.pth  from huggingface.co/TurboDiffusion/TurboWan2.1-T2V-1.3B-480P
  vae/Wan2.1_VAE.pth                              from huggingface.co/Wan-AI/Wan2.1-T2V-1.3B
  text_encoders/umt5_xxl_fp16.safetensors         from huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged
Missing: {missing}
"""


def model_roots(tree: Path) -> list[Path]:
    return [tree / "models", BASE / "models"]


def find_real_files(roots: list[Path]) -> dict[str, str | None]:
    """For each model folder, the first accepted release file present in any root (None if absent)."""
    found = {}
    for folder, names in REAL_FILES.items():
        found[folder] = next((n for n in names for root in roots if (root / folder / n).is_file()), None)
    return found


def write_extra_model_paths(tree: Path) -> Path:
    """A ComfyUI extra_model_paths file that adds the tree's own models folders to the demo's."""
    folders = [f"  {folder}: models/{folder}" for folder in REAL_FILES]
    lines = ["comfyui_tree:", f"  base_path: {tree}", *folders]
    path = DEMO_DIR / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_model_files() -> dict[str, str]:
    """Write (once) tiny random-weight checkpoints in the release formats; their names per model folder."""
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_tiny_models import FILE_NAMES, write_tiny_models

    names = {folder: FILE_NAMES[role] for folder, role in TINY_ROLES.items()}
    if not all((BASE / "models" / folder / name).is_file() for folder, name in names.items()):
        write_tiny_models(BASE / "models")
    return names


def build_prompt(files: dict[str, str], tiny: bool) -> dict:
    import json

    prompt = json.loads(T2V_WORKFLOW.read_text())
    for node in prompt.values():
        for folder, (class_type, input_name) in LOADER_INPUTS.items():
            if node["class_type"] == class_type:
                node["inputs"][input_name] = files[folder]
        if tiny and node["class_type"] == "TD_EmptyVideoLatent":
            node["inputs"].update(TINY_VIDEO)
    return prompt


class ProgressPrinter:
    """Prints which node runs and the progress it reports, as the websocket messages arrive."""

    def __init__(self, prompt: dict):
        self.titles = {node_id: node["_meta"]["title"] for node_id, node in prompt.items()}
        self.shown_tenths: dict[str, int] = {}

    def __call__(self, message: dict) -> None:
        data = message["data"]
        title = self.titles.get(data.get("node"), data.get("node"))
        if message["type"] == "executing" and data.get("node") is not None:
            print(f"running {title}", flush=True)
        elif message["type"] == "progress":
            tenths = data["value"] * 10 // max(1, data["max"])
            if tenths > self.shown_tenths.get(data["node"], -1):  # at most ten lines per node
                self.shown_tenths[data["node"]] = tenths
                print(f"  {title}: {data['value']}/{data['max']}", flush=True)


def main() -> int:
    tree = find_comfyui_dir()
    if tree is None:
        print("No ComfyUI tree found: run `make setup` (or set COMFYUI_DIR to a ComfyUI checkout).")
        return 1
    BASE.mkdir(parents=True, exist_ok=True)
    found = find_real_files(model_roots(tree))
    missing = [REAL_FILES[folder][0] for folder, name in found.items() if name is None]
    tiny = bool(missing)
    if tiny:
        print(NOISE_WARNING.format(models=tree / "models", missing=", ".join(missing)))
        files = tiny_model_files()
    else:
        files = found
        print(f"Using the real checkpoints: {', '.join(files.values())}")
    prompt = build_prompt(files, tiny)

    extra_paths = write_extra_model_paths(tree)
    host = ComfyHost(tree, BASE, extra_args=("--extra-model-paths-config", str(extra_paths)))
    print(f"Starting ComfyUI ({tree}) on {host.client.url} ...", flush=True)
    with host as client:
        result = client.run(prompt, on_event=ProgressPrinter(prompt), timeout=3600)
    if result.status != "success":
        error = result.first("execution_error") or {}
        print(f"The workflow failed: {error.get('exception_message', result.status)}")
        print(f"Server log: {host.log_path}")
        return 1
    save = next(node_id for node_id, node in prompt.items() if node["class_type"] == "TD_SaveVideo")
    saved = result.outputs[save]["images"][0]
    video = BASE / "output" / saved["subfolder"] / saved["filename"]
    print(f"Wrote {video}" + (" (random weights: noise)" if tiny else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
