"""Run tests/test_saelens.py where the real sae-lens is installed (bench/.venv-peers), so the SAELens interop
is checked against SAELens itself: `SAE.load_from_disk` on our export, and a TopK SAE saved by SAELens imported.

    .venv/bin/python bench/check_saelens.py                  # the whole test file (about 2 min on 2 cores)
    .venv/bin/python bench/check_saelens.py -k "not part2"   # extra arguments go to pytest (here: seconds)

In the main .venv the two real-SAELens tests skip (sae-lens is never a runtime dependency); here they must run:
the check fails if any test is skipped. The peer environment is built on first use by bench_sae_peers.py's
`build_peer_env` (torch==2.13.0 first, then requirements.txt and bench/requirements-peers.txt).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sae_peers as peers  # noqa: E402


def peer_python() -> str:
    """The interpreter with sae-lens: this one if it has it, else bench/.venv-peers (built if missing)."""
    try:
        import sae_lens  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    return str(peers.build_peer_env())


def ensure_importable(py: str) -> None:
    """pytest and this project's requirements must import in the peer venv (they are in requirements.txt)."""
    probe = "import pytest, safetensors, tqdm, transformers, datasets, scipy, matplotlib, sae_lens"
    if subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return
    print("installing pytest and requirements.txt into the peer environment ...", flush=True)
    subprocess.check_call([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "pytest",
                           "-r", str(ROOT / "requirements.txt")])


def main() -> int:
    py = peer_python()
    ensure_importable(py)
    version = subprocess.run([py, "-c", "import sae_lens, torch; print(sae_lens.__version__, torch.__version__)"],
                             capture_output=True, text=True).stdout.split()
    print(f"sae-lens {version[0]}, torch {version[1]} ({py})", flush=True)
    cmd = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_saelens.py", *sys.argv[1:]]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True, text=True)
    print(proc.stdout + proc.stderr, end="", flush=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0 and "skipped" in summary:
        print("FAILED: tests were skipped in the sae-lens environment; the real-SAELens checks did not run")
        return 1
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
