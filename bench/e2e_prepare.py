"""Prepares, on a machine with network access, what bench/e2e.py needs on the lent GPU (which has none):

    python bench/e2e_prepare.py --turbodiffusion GIT_DIR [--comfyui DIR] [--skip-wheels]

1. The reference network: the files of thu-ml/TurboDiffusion that `inference/modify_model.py` needs to build
   the Wan2.1 network with its SLA attention and FastNorm kernels, read from a clone (a bare git directory
   works: the `fetch` tool's mirror) into `.ref/turbodiffusion/`. `.ref/` is git-ignored: this code is
   carried to the GPU, never committed.
2. A ComfyUI tree for the in-process queue of bench/e2e.py part (c): the installed one (`make setup`) copied
   to `.ref/ComfyUI` without what the run does not read (tokenizer vocabularies of other models, tests,
   API-node clients, caches), to stay inside the 64 MiB that travel with a run.
3. Wheels of the packages the GPU image lacks (KINDS.md's package list) into `.whl/`: PyAV for the MP4,
   ftfy for prompts, torchsde (imported by ComfyUI's samplers module).

Prints the size of the tree that will travel and the `run` command (with its carry list) to use.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FILES = (
    "turbodiffusion/inference/modify_model.py",
    "turbodiffusion/rcm/networks/wan2pt1.py",
    "turbodiffusion/rcm/networks/wan2pt2.py",
    "turbodiffusion/rcm/utils/a2a_cp.py",
    "turbodiffusion/rcm/utils/attention.py",
    "turbodiffusion/rcm/utils/context_parallel.py",
    "turbodiffusion/rcm/utils/selective_activation_checkpoint.py",
    "turbodiffusion/imaginaire/__init__.py",
    "turbodiffusion/imaginaire/utils/__init__.py",
    "turbodiffusion/ops/__init__.py",
    "turbodiffusion/ops/core.py",
    "turbodiffusion/SLA/__init__.py",
    "turbodiffusion/SLA/core.py",
    "turbodiffusion/SLA/kernel.py",
    "turbodiffusion/SLA/utils.py",
)
# Top-level folders of the ComfyUI tree that the in-process run never reads, and vocabulary folders of text
# encoders other than ours (the biggest part of the tree).
COMFYUI_SKIPPED_TOP = ("tests", "tests-unit", "comfy_api_nodes", "models", "output", "input", "user")
COMFYUI_SKIPPED_TOP += ("custom_nodes", "script_examples", ".git", ".github")
COMFYUI_SKIPPED_TOKENIZERS = ("comfy/text_encoders", "comfy")
# Python 3.12 wheels for the GPU image; versions as in this checkout's .venv where it has them.
WHEELS = ("av==18.1.0", "ftfy==6.3.1", "wcwidth==0.2.13", "torchsde==0.2.6", "trampoline==0.1.2")
# The GPU tests drive ComfyUI through tools/comfy_host.py, which needs websocket-client.
WHEELS += ("websocket-client==1.9.2",)
CARRY = (".ref", ".whl")
CARRY_LIMIT = 64 * 2**20


def copy_reference(git_dir: Path, target: Path) -> None:
    bare = git_dir if not (git_dir / ".git").exists() else git_dir / ".git"
    for relative in REFERENCE_FILES:
        shown = subprocess.run(
            ["git", f"--git-dir={bare}", "show", f"HEAD:{relative}"], capture_output=True, check=True
        )
        destination = target / relative.removeprefix("turbodiffusion/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(shown.stdout)
    print(f"reference: {len(REFERENCE_FILES)} files -> {target}")


def _skipped(comfy_dir: Path):
    def ignore(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).relative_to(comfy_dir).as_posix()
        skipped = {name for name in names if name == "__pycache__" or name.endswith(".pyc")}
        if relative == ".":
            skipped.update(name for name in names if name in COMFYUI_SKIPPED_TOP)
        if relative in COMFYUI_SKIPPED_TOKENIZERS:
            skipped.update(name for name in names if name.endswith("_tokenizer"))
        return skipped

    return ignore


def copy_comfyui(comfy_dir: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(comfy_dir, target, ignore=_skipped(comfy_dir))
    print(f"ComfyUI: {comfy_dir} -> {target} ({folder_bytes(target) / 2**20:.1f} MiB)")


def download_wheels(target: Path) -> None:
    platforms = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(target)]
    command += [f"--platform={platform}" for platform in platforms]
    subprocess.run([*command, *WHEELS], check=True)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def travelling_bytes() -> int:
    """Tracked and untracked-not-ignored files, plus the carried folders."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True
    ).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name]
    return sum(path.stat().st_size for path in files if path.is_file()) + sum(
        folder_bytes(ROOT / folder) for folder in CARRY
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turbodiffusion", type=Path, required=True, help="thu-ml/TurboDiffusion git dir")
    parser.add_argument("--comfyui", type=Path, default=ROOT / ".comfyui" / "ComfyUI")
    parser.add_argument("--skip-wheels", action="store_true")
    args = parser.parse_args()
    copy_reference(args.turbodiffusion, ROOT / ".ref" / "turbodiffusion")
    copy_comfyui(args.comfyui, ROOT / ".ref" / "ComfyUI")
    if not args.skip_wheels:
        download_wheels(ROOT / ".whl")
    size = travelling_bytes()
    print(f"travels with carry {list(CARRY)}: {size / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f}")
    if size > CARRY_LIMIT:
        sys.exit("too large to travel: remove wheels bench/e2e.py does not need from .whl/")


if __name__ == "__main__":
    main()
