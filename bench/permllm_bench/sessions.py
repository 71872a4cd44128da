"""Three-process sessions of the bench (owner, user and helper over ZeroMQ, started with the launcher's
public commands), and what the bench records about the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from parties.progress import progress_bar
from permllm.errors import ConfigError
from permllm_bench.config import MODEL
from permllm_bench.cost_model import profile_figures


def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu or platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch_version,
        "platform": platform.platform(),
    }


def loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def say(msg: str) -> None:
    print(f"permllm bench: {msg}", file=sys.stderr, flush=True)


def run_session(
    network: str,
    prompt: str,
    max_new_tokens: int,
    *,
    timeout: float = 1800.0,
    insecure: bool = False,
    threads: int = 1,
    model: str = MODEL,
) -> dict:
    """One demo session of `model` (owner, helper, user as processes over ZeroMQ, the launcher's
    commands) under `network`; returns the launcher's merged summary plus profile figures and the
    session's wall time."""
    from parties.launcher import ROLES, free_ports, merge_reports, role_commands, stop_roles

    args = SimpleNamespace(
        network=network,
        timeout=300.0,
        setup_timeout=900.0,
        threads=threads,
        insecure=insecure,
        max_new_tokens=max_new_tokens,
        model=model,
        prompt=prompt,
        temperature=None,
        top_k=None,
        top_p=None,
        seed=None,
        sample=False,
        pool_depth=0,  # no session dealt ahead in the background while this one is measured
    )
    with tempfile.TemporaryDirectory(prefix="permllm-bench-") as tmp:
        reports = Path(tmp)
        commands = role_commands(args, free_ports(3), reports)
        for role in ("owner", "user"):
            commands[role].append("--quiet")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        processes: dict[str, subprocess.Popen] = {}
        logs = {}
        load_before = loadavg()
        start = time.perf_counter()
        bar = progress_bar(None, f"session {network}", unit=None)
        failed = None
        try:
            for role in ROLES:
                logs[role] = open(reports / f"{role}.log", "wb")
                processes[role] = subprocess.Popen(commands[role], env=env, stdout=logs[role], stderr=subprocess.STDOUT)
            while True:  # owner and helper are services: the session ends when the user exits with 0
                codes = {role: proc.poll() for role, proc in processes.items()}
                bad = [(r, c) for r, c in codes.items() if c is not None and (c != 0 or r != "user")]
                if bad:
                    failed = bad[0]
                    break
                if codes["user"] == 0:
                    stop_roles({r: processes[r] for r in ("owner", "helper")}, grace_s=60.0)
                    failed = next(
                        ((r, processes[r].returncode) for r in ("owner", "helper") if processes[r].returncode), None
                    )
                    break
                if time.perf_counter() - start > timeout:
                    failed = ("session", f"timeout after {timeout:.0f} s")
                    break
                bar.refresh()
                time.sleep(0.1)
        finally:
            bar.close()
            stop_roles(processes)
            for f in logs.values():
                f.close()
        wall = time.perf_counter() - start
        if failed:
            role, code = failed
            tails = []
            for r in ROLES:
                path = reports / f"{r}.log"
                if path.exists():
                    text = path.read_text(errors="replace").strip().splitlines()[-15:]
                    tails.append(f"--- {r} ---\n" + "\n".join(text))
            raise ConfigError(f"the {network!r} session failed: the {role} exited with {code}\n" + "\n".join(tails))
        raw = {role: json.loads((reports / f"{role}.json").read_text()) for role in ROLES}
        for role in ("owner", "helper"):  # a service's report lists its sessions: this run had one
            raw[role] = raw[role]["sessions"][0]
    summary = merge_reports(raw, network=network)
    summary.update(profile_figures(network))
    summary["wall_s"] = wall
    summary["loadavg_before"], summary["loadavg_after"] = load_before, loadavg()
    # the owner's "prepare" ends when its last masked weight is handed to the transport; the user's ends
    # when it holds them all (under netsim that includes the simulated transfer): report the latter
    summary["prepare_s_owner"] = summary["prepare_s"]
    summary["prepare_s"] = raw["user"]["phases_s"].get("prepare", summary["prepare_s"])
    summary["offline_wait_s_user"] = raw["user"]["phases_s"].get("offline")
    summary["owner_online_s"] = raw["owner"]["phases_s"].get("online")
    summary["user_online_s"] = raw["user"]["phases_s"].get("online")
    summary["material_left"] = raw["user"].get("material_left")
    return summary
