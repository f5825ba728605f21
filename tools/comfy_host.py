"""Run a headless ComfyUI with this node pack on loopback and talk to it over HTTP and the websocket.

Used by `make demo` (tools/demo.py) and by the real-host tests (tests/comfy_server.py). The server is started
through tools/comfy_launch.py (the torchvision guard) with its own base directory, so models, inputs, outputs
and user settings stay out of the ComfyUI tree; it is stopped by the PID it was started with.
See shared/spec/COMFYUI_HOST.md, sections 2 and 3.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
import websocket

REPO = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "ComfyUI-TurboDiffusion"
LAUNCHER = Path(__file__).resolve().with_name("comfy_launch.py")
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae")


def find_comfyui_dir() -> Path | None:
    """The ComfyUI tree named by $COMFYUI_DIR, else the one `make setup` installs; None if neither exists."""
    configured = os.environ.get("COMFYUI_DIR")
    tree = Path(configured) if configured else REPO / ".comfyui" / "ComfyUI"
    return tree if (tree / "main.py").exists() else None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_base_directory(base: Path, pack_dir: Path = REPO) -> Path:
    """Create ComfyUI's base-directory layout with this pack linked into custom_nodes/."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", *(f"models/{m}" for m in MODEL_FOLDERS)):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER_NAME
    if not link.exists():
        link.symlink_to(pack_dir.resolve(), target_is_directory=True)
    return base


@dataclass
class RunResult:
    """What one queued prompt did: its final status, the saved outputs and every websocket message."""

    prompt_id: str
    status: str
    outputs: dict
    events: list[dict] = field(default_factory=list)

    def first(self, event_type: str) -> dict | None:
        return next((e["data"] for e in self.events if e["type"] == event_type), None)

    def all(self, event_type: str) -> list[dict]:
        return [e["data"] for e in self.events if e["type"] == event_type]


class PromptRejected(RuntimeError):
    """POST /prompt answered 400 (validation failed before anything ran)."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body, indent=1))
        self.body = body


class ComfyClient:
    """A minimal ComfyUI API client (one websocket per queued prompt, as the frontend does)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def get(self, route: str) -> dict:
        reply = requests.get(f"{self.url}{route}", timeout=60)
        reply.raise_for_status()
        return reply.json()

    def post(self, route: str, body: dict) -> requests.Response:
        return requests.post(f"{self.url}{route}", json=body, timeout=60)

    def object_info(self) -> dict:
        return self.get("/object_info")

    def history(self, prompt_id: str) -> dict:
        return self.get(f"/history/{prompt_id}").get(prompt_id, {})

    def interrupt(self) -> None:
        self.post("/interrupt", {}).raise_for_status()

    def free(self, unload_models: bool = True, free_memory: bool = False) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory}).raise_for_status()

    def queue(self, prompt: dict, client_id: str, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": client_id, "extra_data": extra_data or {}}
        reply = self.post("/prompt", body)
        if reply.status_code != 200:
            raise PromptRejected(reply.json())
        return reply.json()["prompt_id"]

    def run(
        self,
        prompt: dict,
        extra_data: dict | None = None,
        on_event: Callable[[dict], None] | None = None,
        timeout: float = 600.0,
    ) -> RunResult:
        """Queue `prompt`, follow it over the websocket until it finishes, return its history entry."""
        client_id = uuid.uuid4().hex
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        connection = websocket.create_connection(ws_url, timeout=timeout)
        events: list[dict] = []
        try:
            prompt_id = self.queue(prompt, client_id, extra_data)
            deadline = time.monotonic() + timeout
            while True:
                connection.settimeout(max(0.1, deadline - time.monotonic()))
                frame = connection.recv()
                if isinstance(frame, bytes):
                    continue  # binary preview images
                message = json.loads(frame)
                data = message.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                events.append(message)
                if on_event is not None:
                    on_event(message)
                if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id"):
                    break
        except websocket.WebSocketTimeoutException as error:
            raise TimeoutError(f"prompt did not finish within {timeout:.0f} s") from error
        finally:
            connection.close()
        entry = self._history_when_written(prompt_id)
        return RunResult(prompt_id, entry["status"]["status_str"], entry.get("outputs", {}), events)

    def _history_when_written(self, prompt_id: str) -> dict:
        for _ in range(100):
            entry = self.history(prompt_id)
            if entry.get("status"):
                return entry
            time.sleep(0.05)
        raise RuntimeError(f"prompt {prompt_id} finished but has no history entry")


class ComfyHost:
    """A ComfyUI server process: `start()` waits until it answers, `stop()` ends it by its PID."""

    def __init__(self, tree: Path, base: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.tree = tree
        self.base = base
        self.port = port or free_loopback_port()
        self.extra_args = extra_args
        self.log_path = base / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.client = ComfyClient(f"http://127.0.0.1:{self.port}")

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(LAUNCHER),
            str(self.tree),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--disable-api-nodes",
            "--database-url",
            "sqlite:///:memory:",
            *self.extra_args,
        ]

    def start(self, timeout: float = 180.0) -> ComfyClient:
        prepare_base_directory(self.base)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up; log tail:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.client.url}/system_stats", timeout=2).status_code == 200:
                    return self.client
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def __enter__(self) -> ComfyClient:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
