"""`python -m workbench app [--workspace W]`: start the Streamlit server on a workspace and open it.

`start_app(workspace)` is the same thing as a function for other code (the demo,
the tests, the benchmark): it starts `streamlit run app.py` in its own process
on a free local port, waits until the server answers its health check, and
returns an `AppServer` (url, process) whose `stop()` ends it. The server reads
the workspace only; it is told which one through $WORKBENCH_WORKSPACE.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.workspace import ENV_VAR, Workspace

APP_FILE = Path(__file__).resolve().parent.parent / "app.py"


@dataclass
class AppServer:
    """A running app server: open `url` in a browser; `stop()` ends the process."""

    url: str
    process: subprocess.Popen
    workspace: Path
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> "AppServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_app(workspace: str | os.PathLike | None = None, *, port: int | None = None, host: str = "127.0.0.1",
              timeout: float = 120.0, log: str | os.PathLike | None = None, env: dict | None = None) -> AppServer:
    """Start the app on `workspace` and return once it answers (or raise a WorkbenchError with the log's tail)."""
    ws = Workspace(workspace)
    port = port or free_port(host)
    log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="workbench-app-", suffix=".log")[1])
    command = [sys.executable, "-m", "streamlit", "run", str(APP_FILE), "--server.headless", "true",
               "--server.port", str(port), "--server.address", host, "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--server.runOnSave", "false", "--global.developmentMode", "false",
               "--client.toolbarMode", "minimal"]
    child_env = {**os.environ, ENV_VAR: str(ws.root), **(env or {})}
    with open(log_path, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env, cwd=str(APP_FILE.parent))
    server = AppServer(f"http://{host}:{port}", process, ws.root, log_path)
    try:
        _wait_healthy(server, timeout)
    except BaseException:  # a failed or interrupted start leaves no server behind
        server.stop()
        raise
    return server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def configure_app(parser) -> None:
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")


def run_app(args) -> dict:
    """Serve until interrupted; the summary says where it ran."""
    return serve(args.workspace, port=args.port, host=args.host, open_browser=not args.no_browser)


def serve(workspace: str | os.PathLike | None = None, *, port: int | None = None, host: str = "127.0.0.1",
          open_browser: bool = True) -> dict:
    """Start the app, open it in a browser tab, and serve until Ctrl+C (what the demo ends with)."""
    server = start_app(workspace, port=port, host=host)
    try:  # from here on Ctrl+C is the way to stop serving, wherever it lands
        print(f"workbench app on {server.workspace}: {server.url}  (Ctrl+C stops it; log {server.log})", file=sys.stderr,
              flush=True)
        if open_browser:
            import webbrowser

            webbrowser.open(server.url)
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return {"url": server.url, "workspace": str(server.workspace), "exit_code": server.process.returncode}


def _wait_healthy(server: AppServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise WorkbenchError(f"the app server exited with status {server.process.returncode}: {_tail(server.log)}")
        try:
            with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise WorkbenchError(f"the app server did not answer within {timeout:.0f} s: {_tail(server.log)}")


def _tail(path: Path, chars: int = 400) -> str:
    try:
        return " ".join(path.read_text(errors="replace")[-chars:].split())
    except OSError:
        return "(no log)"
