"""A run stopped by ``timeout`` (or any supervisor that signals the run's process group) stops as on Ctrl-C,
with its local Ray still up to be shut down: Ray's processes have a process group of their own
(fleet.pipeline.ray_start.ray_in_own_process_group). Before, the group's SIGTERM killed the GCS and raylet
with the driver's signal, and the driver then waited on the dead GCS until Ray ended it after 60 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import os, signal, sys
from omegaconf import OmegaConf
import ray
from fleet.pipeline.ray_start import start_ray

def as_ctrl_c(signum, frame):  # the apps' (fleet.apps.errors.stop_on_signals)
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, as_ctrl_c)
cfg = OmegaConf.load({conf!r})
cfg.num_cpus = 1
start_ray(cfg)
out = open({out!r}, "a", buffering=1)
print("ready", os.getpid(), file=out)
try:
    signal.pause()
except KeyboardInterrupt:
    print("interrupted, ray answers", ray.get(ray.remote(lambda: 7).remote()), len(ray.nodes()), file=out)  # raylet, a worker, the GCS
    ray.shutdown()
    print("ray shut down", file=out)
"""


def test_a_signal_to_the_runs_process_group_leaves_its_ray_up_for_the_driver_to_stop(tmp_path):
    out = tmp_path / "driver.out"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(conf=str(ROOT / "conf/ray/local.yaml"), out=str(out)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # As `timeout` runs a command: a group led by the supervisor (here sh), the driver a member of it.
    shell = subprocess.Popen(["sh", "-c", f'"{sys.executable}" "{script}" & wait'], env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and out.read_text().startswith("ready")):
            assert time.monotonic() < deadline and shell.poll() is None, "the driver did not start Ray"
            time.sleep(0.2)
        pid = int(out.read_text().split()[1])
        assert os.getpgid(pid) == shell.pid  # the driver is still in the group it was started in
        os.killpg(shell.pid, signal.SIGTERM)  # what timeout does when time is up (after signalling the command itself)
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = out.read_text().splitlines()
        assert lines[1:] == ["interrupted, ray answers 7 1", "ray shut down"], lines
    finally:
        shell.kill()
        shell.wait()


IN_GROUP = """
import os
from fleet.pipeline.ray_start import ray_in_own_process_group
before = os.getpgrp()
with ray_in_own_process_group():
    print("moved" if os.getpgrp() != before else "stayed", flush=True)
"""


def test_a_run_in_a_terminals_foreground_group_keeps_ray_in_it(tmp_path):
    """`make demo` at a terminal: flywheel is a member (not the leader) of the foreground group. Moved to a group of its
    own while Ray starts, it was in the background: a Ctrl-C then missed it, and under `stty tostop` Ray's first log
    line stopped it (SIGTTOU) for good. Without a terminal (timeout, CI) a member still moves, as the test above needs."""
    import pty

    script = tmp_path / "in_group.py"
    script.write_text(IN_GROUP)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pid, fd = pty.fork()
    if pid == 0:  # the terminal's session leader, as a shell is; the driver is a member of its (foreground) group
        os.execve("/bin/sh", ["sh", "-c", f'"{sys.executable}" "{script}"'], env)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    assert out.decode().strip() == "stayed", out
    alone = subprocess.run(["sh", "-c", f'"{sys.executable}" "{script}"'], env=env, capture_output=True, text=True, start_new_session=True, timeout=60)
    assert alone.stdout.strip() == "moved", alone.stderr
